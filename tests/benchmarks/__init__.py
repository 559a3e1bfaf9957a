"""Smoke runs of the benchmarks (benchmarks/) and their argument checks."""

import pytest


def assert_usage_error(main, argv: list, needle: str, capsys) -> None:
    """`main(argv)` exits with argparse's code 2 and one message containing `needle`, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
