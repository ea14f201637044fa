"""``one_line``: third-party error messages collapsed to the single line our errors promise."""

import pytest

from bevnext.errors import one_line


def test_multi_line_message_becomes_one_line():
    err = ImportError("libhccl.so: cannot open shared object file\n  (second line)\t end ")
    assert one_line(err) == "libhccl.so: cannot open shared object file (second line) end"
    assert one_line(err, with_type=True) == "ImportError: libhccl.so: cannot open shared object file (second line) end"


@pytest.mark.parametrize("err", [AssertionError(), AssertionError(" \n "), RuntimeError("")])
def test_empty_message_gives_the_type_name(err):
    # The devkit's bare `assert`s carry no message; the type is then all there is to say.
    name = type(err).__name__
    assert one_line(err) == one_line(err, with_type=True) == name


def test_key_error_keeps_its_quotes():
    # str(KeyError) quotes the key; the collapsed text is exactly what str() gave.
    assert one_line(KeyError("sample_token")) == "'sample_token'"
