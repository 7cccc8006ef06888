"""The examples in the public docstrings run and print what they say."""

import doctest

import pytest

import demoe.api
import demoe.degrade
import demoe.routing


@pytest.mark.parametrize("module", [demoe.api, demoe.degrade, demoe.routing])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
