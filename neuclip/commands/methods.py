"""`neuclip methods`: list the registered normaliser estimators."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("methods", help="list the registered methods (estimators)")
    parser.add_argument("--options", action="store_true", help="also print each method's options and defaults")
    parser.set_defaults(func=run)


def run(args) -> int:
    from neuclip.estimators.registry import METHODS, estimator_class

    width = max(map(len, METHODS))
    for name, (_, description) in METHODS.items():
        print(f"{name:<{width}}  {description}")
        if args.options:
            for key, value in sorted(estimator_class(name).defaults.items()):
                print(f"{'':<{width}}    {key} = {value!r}")
    return 0
