"""``mammo-ray``: one CLI, thin: parse, call the library, print a summary (or one JSON object).

One module per command group, each adding its subcommands to the parser ``app.build_parser``
builds, and one shared output module:

    app.py       the parser, ``main``, the exit codes (2 usage, 1 an explained failure)
    output.py    ``--json`` output (exactly one JSON object on stdout) and shared text helpers
    data.py      synth, index, split, prepare
    train.py     train, evaluate
    search.py    tune, ensemble
    demo.py      demo (data, then a search and an ensemble, then serving)
    localize.py  localize, froc, explain, dream
    serve.py     serve

The import rule. Everywhere else in mammo_ray imports go at the top of the module. The CLI
modules are the one exception: ``mammo-ray --help`` (and any command's ``--help``) must answer
at once, so these modules import at their top only the standard library, ``mammo_ray.constants``
and ``mammo_ray.cli.output`` (and other ``mammo_ray.cli`` modules). Everything that takes a while
to import (numpy, pandas, torch, ray, mlflow, and the mammo_ray modules that pull them in) is
imported inside the command function that needs it. Type-only imports sit under
``if TYPE_CHECKING:``. Command modules never import ``app``: it imports them, so there is no cycle.
"""

from mammo_ray.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
