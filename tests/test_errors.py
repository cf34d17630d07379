"""Errors raised again on every rank from the name and message that rank 0 broadcast."""

from __future__ import annotations

import pytest

from ddp_diffusion.errors import DDPDiffusionError, UserError, WriteFailed, error_class


class StaleRunDir(UserError):
    """Defined here, two levels below DDPDiffusionError: any module may define one."""


class StaleRunDirDeeper(StaleRunDir):
    pass


@pytest.mark.parametrize("cls", [DDPDiffusionError, WriteFailed, StaleRunDir, StaleRunDirDeeper])
def test_an_error_defined_anywhere_is_found_by_its_name(cls: type[DDPDiffusionError]) -> None:
    assert error_class(cls.__name__) is cls


def test_an_unknown_name_is_not_an_error_class() -> None:
    with pytest.raises(KeyError):
        error_class("ValueError")  # an Exception, not one of ours: never sent between ranks
