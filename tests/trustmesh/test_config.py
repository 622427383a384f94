"""Default store resolution: $TRUSTMESH_HOME, else ~/.local/share/trustmesh."""

from __future__ import annotations

from pathlib import Path

from trustmesh.config import default_store_path


def test_trustmesh_home_wins() -> None:
    env = {"TRUSTMESH_HOME": "/srv/tm", "HOME": "/home/u"}
    assert default_store_path(env) == Path("/srv/tm")


def test_home_fallback() -> None:
    assert default_store_path({"HOME": "/home/u"}) == Path("/home/u/.local/share/trustmesh")
    assert default_store_path({"TRUSTMESH_HOME": "  ", "HOME": "/home/u"}) == Path(
        "/home/u/.local/share/trustmesh"
    )


def test_tilde_is_expanded() -> None:
    assert default_store_path({"TRUSTMESH_HOME": "~/tm", "HOME": "/home/u"}).is_absolute()


def test_duration_option() -> None:
    from datetime import timedelta

    import click
    import pytest

    from trustmesh.config import duration_option

    ctx = click.Context(click.Command("x"))
    param = click.Option(["--d"])
    assert duration_option(ctx, param, "90s") == timedelta(seconds=90)
    assert duration_option(ctx, param, None) is None
    with pytest.raises(click.BadParameter, match="invalid duration"):
        duration_option(ctx, param, "soon")
