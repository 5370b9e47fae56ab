"""Row generators for the demo datasets (`lorafleet.demo_data` writes them): `price` and `support`.

Each module exposes `make_row(rng) -> {"instruction", "input", "output"}`, drawing only from `rng`.
"""
