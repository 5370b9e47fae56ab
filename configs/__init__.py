"""The shipped job configs, as data: installed as `lorafleet.configs` so `lorafleet demo` finds them in a wheel."""
