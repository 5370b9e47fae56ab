"""Product pricing rows: a product description in, its price out ("$123.45").

    make_row(random.Random(0))  # {"instruction": "Estimate the price ...", "input": "...", "output": "$48.10"}

The price follows a hidden multiplicative rule that the description carries but never states:

    price = category base × product-type factor × brand tier × size factor × material factor
            × premium of each feature × log-normal noise (sigma NOISE_SIGMA)

Brand names are invented and their tier is never written, so a model has to learn it from the prices.
Some words carry no price at all (colours, closing remarks, a few features whose premium is 1.0).
"""

from __future__ import annotations

import random
from typing import NamedTuple

INSTRUCTION = "Estimate the price of this product in US dollars."
COMPLETION_CUE = "Price:"
NOISE_SIGMA = 0.12  # about +-12 %: the floor that even a perfect model of the rule cannot beat
MIN_PRICE = 1.0


class Category(NamedTuple):
    base: float  # dollars
    types: dict[str, float]  # product type: price factor
    materials: dict[str, float]  # material: price factor (empty: never mentioned)
    features: dict[str, float]  # feature: price premium (1.0: mentioned, but free)


CATEGORIES = {
    "electronics": Category(
        base=120.0,
        types={"headphones": 0.8, "bluetooth speaker": 0.6, "computer monitor": 2.0, "tablet": 2.6},
        materials={"plastic": 0.85, "aluminum": 1.15, "recycled plastic": 0.9},
        features={"noise cancelling": 1.35, "fast charging": 1.1, "water resistance": 1.12, "a USB-C port": 1.0},
    ),
    "kitchen": Category(
        base=45.0,
        types={"blender": 1.3, "chef's knife": 0.7, "coffee maker": 1.5, "cookware set": 2.4, "stand mixer": 4.0},
        materials={"plastic": 0.85, "stainless steel": 1.2, "bamboo": 1.0, "cast iron": 1.15, "ceramic": 1.05},
        features={"a non-stick coating": 1.12, "programmable settings": 1.25, "dishwasher-safe parts": 1.0},
    ),
    "furniture": Category(
        base=220.0,
        types={"desk chair": 1.0, "bookshelf": 0.7, "coffee table": 0.9, "sofa": 3.5, "nightstand": 0.5},
        materials={"pine": 0.85, "solid oak": 1.45, "walnut": 1.6, "steel": 1.05, "leather": 1.5, "fabric": 0.95},
        features={
            "storage drawers": 1.15,
            "adjustable height": 1.25,
            "a handcrafted finish": 1.35,
            "easy assembly": 1.0,
        },
    ),
    "outdoor": Category(
        base=80.0,
        types={"tent": 1.8, "camping chair": 0.5, "cooler": 1.1, "gas grill": 3.5, "hiking backpack": 1.0},
        materials={"nylon": 0.95, "canvas": 1.0, "aluminum": 1.15, "stainless steel": 1.2, "polyester": 0.9},
        features={"full waterproofing": 1.15, "an ultralight build": 1.3, "insulation": 1.2, "a carry bag": 1.0},
    ),
    "toys": Category(
        base=25.0,
        types={"building block set": 1.6, "plush bear": 0.6, "remote-control car": 1.8, "board game": 1.0},
        materials={"plastic": 0.85, "wood": 1.2, "plush fabric": 1.0, "cardboard": 0.8},
        features={"lights and sounds": 1.2, "a collectible edition": 1.4, "a design for ages 3 and up": 1.0},
    ),
    "beauty": Category(
        base=22.0,
        types={"face serum": 1.4, "hair dryer": 2.4, "shampoo": 0.6, "perfume": 2.8, "moisturizer": 1.0},
        materials={},
        features={"organic ingredients": 1.25, "salon-grade results": 1.35, "a fragrance-free formula": 1.0},
    ),
    "tools": Category(
        base=60.0,
        types={"cordless drill": 1.8, "tool set": 1.5, "tape measure": 0.3, "circular saw": 2.2, "step ladder": 1.7},
        materials={"steel": 1.05, "aluminum": 1.15, "fiberglass": 1.25, "chrome vanadium steel": 1.3},
        features={
            "a brushless motor": 1.3,
            "two included batteries": 1.35,
            "a carrying case": 1.08,
            "a lifetime warranty": 1.15,
        },
    ),
}
BRAND_TIERS = {  # tier: (price multiplier, brands); the tier name never appears in a description
    "budget": (0.6, ("Valuline", "Brightway", "Thriftco")),
    "midrange": (1.0, ("Northfield", "Everly", "Corvan")),
    "premium": (1.7, ("Alderan", "Stellix", "Halvorsen")),
    "luxury": (2.6, ("Aurelian", "Vantorre", "Lumeris")),
}
SIZES = (  # (price factor, ways to say it)
    (0.75, ("compact", "small")),
    (1.0, ("standard", "mid-size")),
    (1.3, ("large", "big")),
    (1.7, ("extra-large", "oversized")),
)
COLORS = ("black", "white", "gray", "navy", "red", "green", "beige", "silver")
REMARKS = (
    "Great for everyday use.",
    "Ships in recyclable packaging.",
    "A popular gift choice.",
    "Easy to clean and store.",
    "Backed by friendly customer service.",
)
FEATURE_OPENERS = ("It features", "It comes with", "Highlights include", "It offers")


def make_row(rng: random.Random) -> dict[str, str]:
    category = CATEGORIES[rng.choice(sorted(CATEGORIES))]
    kind = rng.choice(sorted(category.types))
    tier_factor, brands = BRAND_TIERS[rng.choice(sorted(BRAND_TIERS))]
    brand = rng.choice(brands)
    size_factor, size_words = rng.choice(SIZES)
    material = rng.choice(sorted(category.materials)) if category.materials else ""
    features = rng.sample(sorted(category.features), rng.randint(0, 3))

    price = category.base * category.types[kind] * tier_factor * size_factor * category.materials.get(material, 1.0)
    for feature in features:
        price *= category.features[feature]
    price = max(MIN_PRICE, price * rng.lognormvariate(0.0, NOISE_SIGMA))
    text = _describe(rng, brand, rng.choice(size_words), material, kind, features)
    return {"instruction": INSTRUCTION, "input": text, "output": f"${price:.2f}"}


def as_completion(row: dict[str, str]) -> dict[str, str]:
    """The same row as a completion: the description, then "Price:", answered with " $123.45"."""
    return {"prompt": f"{row['input']}\n{COMPLETION_CUE}", "completion": f" {row['output']}"}


def _describe(rng: random.Random, brand: str, size: str, material: str, kind: str, features: list[str]) -> str:
    """One to three sentences: the product, its features (if any), then maybe a colour or a remark."""
    made_of = f" made of {material}" if material else ""
    article = "An" if size[0] in "aeiou" else "A"
    product = rng.choice(
        (
            f"{brand} {size} {material} {kind}.",
            f"{article} {size} {kind} from {brand}{made_of}.",
            f"{brand}'s {size} {kind}{made_of}.",
            f"This {size} {material} {kind} is made by {brand}.",
        )
    )
    sentences = [" ".join(product.split())]  # no material leaves a double space
    if features:
        listed = features[0] if len(features) == 1 else ", ".join(features[:-1]) + " and " + features[-1]
        sentences.append(f"{rng.choice(FEATURE_OPENERS)} {listed}.")
    extra = rng.choice((f"Available in {rng.choice(COLORS)}.", rng.choice(REMARKS), ""))
    if extra:
        sentences.append(extra)
    return " ".join(sentences)
