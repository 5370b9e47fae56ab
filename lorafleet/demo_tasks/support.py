"""Support ticket rows: a customer's ticket in, its category and a one-sentence reply out.

    make_row(random.Random(0))
    # {"instruction": "Classify ...", "input": "Hi,\\nMy order ...", "output": "Category: shipping\\nReply: ..."}

Every category has a few issues; each issue has several ticket wordings and exactly one reply template, so
the reply is fully determined by the ticket (the order number, product or email it mentions is copied in).
"""

from __future__ import annotations

import random

INSTRUCTION = "Classify this support ticket and write a one-sentence reply."

# category: {issue: (ticket wordings, reply)}; a reply uses only the slots that every wording of its issue has
ISSUES: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "billing": {
        "double charge": (
            (
                "I was charged twice for order {order}; my card shows two payments of ${amount}.",
                "Why did you bill me two times for order {order}? I only bought one {product}.",
            ),
            "I'm sorry about the duplicate charge on order {order}; we've reversed the extra payment and it will "
            "leave your statement within 5 business days.",
        ),
        "invoice": (
            (
                "Can I get an invoice for order {order}? I need it for my expense report.",
                "Please send me a VAT invoice for order {order}, the {product} I bought for the office.",
            ),
            "We've emailed the invoice for order {order} to the address on your account.",
        ),
        "price difference": (
            (
                "I was charged ${amount} for order {order}, but the checkout page showed a lower price.",
                "The total on order {order} is higher than what I saw in my cart. Please fix the amount.",
            ),
            "Thanks for flagging this; we've corrected the total on order {order} and refunded the difference.",
        ),
    },
    "shipping": {
        "late delivery": (
            (
                "My order {order} was supposed to arrive {days} days ago and still hasn't shown up.",
                "Where is my {product}? Order {order} is {days} days late.",
            ),
            "I'm sorry order {order} is late; we've asked the carrier to trace it and will email you an update "
            "within 24 hours.",
        ),
        "tracking": (
            (
                "The tracking page for order {order} hasn't updated in {days} days.",
                "Tracking for order {order} just says 'label created'. Has it actually shipped?",
            ),
            "We've refreshed the tracking for order {order}, and a new tracking link is on its way to your inbox.",
        ),
        "address change": (
            (
                "I need to change the delivery address for order {order} before it ships.",
                "I moved last week. Can you send order {order} to my new address instead?",
            ),
            "We've paused order {order} so you can confirm the new delivery address from your account page.",
        ),
    },
    "account": {
        "password reset": (
            (
                "I can't reset my password; the reset email never arrives at {email}.",
                "Password reset links aren't reaching {email}. I've checked spam too.",
            ),
            "We've sent a fresh password reset link to {email}; it should arrive within a few minutes.",
        ),
        "locked account": (
            (
                "My account got locked after too many login attempts.",
                "It says my account is locked and I can't sign in to check my orders.",
                "I'm locked out of my account even though my password is right.",
            ),
            "We've unlocked your account, so you can sign in again now.",
        ),
        "email change": (
            (
                "How do I change the email on my account from {email} to a new one?",
                "I no longer use {email}. Please help me update my login email.",
            ),
            "You can change your email under Account Settings > Profile, and we'll send a confirmation to {email}.",
        ),
    },
    "technical": {
        "won't power on": (
            (
                "My {product} won't turn on, even after charging it overnight.",
                "The {product} I bought is completely dead. No lights, nothing.",
            ),
            "Please hold the power button on your {product} for 15 seconds to reset it, and reply if it still "
            "doesn't start.",
        ),
        "app crash": (
            (
                "The app crashes every time I try to connect my {product}.",
                "Pairing my {product} with the app fails and the app closes itself.",
            ),
            "Please update the app to the latest version and pair your {product} again, which fixes most "
            "connection crashes.",
        ),
        "error code": (
            (
                "My {product} keeps showing error code E{code}. What does it mean?",
                "Error E{code} pops up on my {product} every time I start it.",
            ),
            "Error E{code} means your {product} needs a firmware update, which you can install from the app "
            "under Settings.",
        ),
    },
    "refund": {
        "return": (
            (
                "I'd like to return the {product} from order {order}; it's not what I expected.",
                "Can I send back order {order}? The {product} doesn't fit my needs.",
            ),
            "We've emailed a prepaid return label for order {order}, and your refund will be issued once the "
            "item arrives.",
        ),
        "refund status": (
            (
                "I returned my {product} {days} days ago and still haven't received my refund.",
                "Still no refund for the {product} I sent back {days} days ago.",
            ),
            "Your refund for the {product} has been processed and should appear on your statement within 3-5 "
            "business days.",
        ),
        "damaged item": (
            (
                "The {product} arrived damaged and I want my money back. Order {order}.",
                "Order {order} came with a cracked {product}. Please refund me.",
            ),
            "I'm sorry your {product} arrived damaged; we've issued a full refund for order {order}, no return needed.",
        ),
    },
}
PRODUCTS = (
    "wireless earbuds",
    "smart thermostat",
    "robot vacuum",
    "fitness tracker",
    "espresso machine",
    "electric toothbrush",
    "security camera",
    "e-reader",
    "air purifier",
    "gaming headset",
    "smart plug",
    "portable charger",
)
NAMES = ("Dana", "Luis", "Priya", "Tom", "Mei", "Olga", "Sam", "Aisha", "Jonas", "Grace")
DOMAINS = ("example.com", "mail.example.org", "inbox.example.net")
GREETINGS = ("Hi,", "Hello,", "Hello support,", "Hey there,", "Good morning,", "")
CLOSINGS = ("Thanks, {name}", "Please help.", "Thank you!", "Regards, {name}", "This is urgent.", "")


def make_row(rng: random.Random) -> dict[str, str]:
    category = rng.choice(sorted(ISSUES))
    wordings, reply = ISSUES[category][rng.choice(sorted(ISSUES[category]))]
    name = rng.choice(NAMES)
    slots = {
        "order": f"#{rng.randint(100000, 999999)}",
        "product": rng.choice(PRODUCTS),
        "amount": f"{rng.randint(15, 400)}.{rng.randint(0, 99):02d}",
        "days": str(rng.randint(2, 14)),
        "email": f"{name.lower()}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}",
        "code": str(rng.randint(10, 99)),
        "name": name,
    }
    parts = [rng.choice(GREETINGS), rng.choice(wordings), rng.choice(CLOSINGS)]  # laid out like an email
    ticket = "\n".join(part.format(**slots) for part in parts if part)
    output = f"Category: {category}\nReply: {reply.format(**slots)}"
    return {"instruction": INSTRUCTION, "input": ticket, "output": output}
