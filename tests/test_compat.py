"""Start-up version check: a too-old package is one line naming it, before anything runs."""

import pytest

from lit_moe_rl.cli import compat, main


def test_installed_versions_are_supported():
    assert compat.unsupported_versions() == []


def test_an_old_or_missing_package_is_named():
    problems = compat.unsupported_versions({"transformers": "99.0", "no-such-package-xyz": "1.0"})
    assert problems[0].startswith("transformers ") and "lit-moe-rl needs transformers>=99.0" in problems[0]
    assert problems[1] == "no-such-package-xyz is not installed: lit-moe-rl needs no-such-package-xyz>=1.0"


def test_cli_refuses_an_old_transformers_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(compat, "MINIMUM", {"transformers": "99.0"})
    monkeypatch.setattr(
        "lit_moe_rl.cli.app.unsupported_versions", lambda: compat.unsupported_versions(compat.MINIMUM)
    )
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformers" in err[0] and "99.0" in err[0]
