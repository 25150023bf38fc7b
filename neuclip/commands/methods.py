"""`neuclip methods`: list the registered normaliser estimators (and, with --options, every option)."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("methods", help="list the registered methods (estimators)")
    parser.add_argument("--options", action="store_true", help="also print each method's options and defaults")
    parser.set_defaults(func=run)


def run(args) -> int:
    from neuclip.estimators.options import describe
    from neuclip.estimators.registry import estimator_class, method_names, shared_option_keys

    names = method_names()
    width = max(map(len, names))
    for name in names:
        cls = estimator_class(name)
        print(f"{name:<{width}}  {cls.description}")
        if args.options:
            for key, opt in sorted(cls.options.items()):
                shared = "  [shared]" if opt.shared else ""
                print(f"{'':<{width}}    {key} = {opt.default!r}  ({describe(opt.schema)}){shared}  {opt.help}")
    if args.options:
        print("\nshared options (an experiment's common_options sets them for every method that takes them):")
        for key, methods in shared_option_keys().items():
            print(f"  {key}: {', '.join(methods)}")
    return 0
