"""SecretMaterial, one read of a product's secret: shared between tasks as it is, so it
cannot change, and its repr (in a log line or a traceback) leaves the secret out."""

from __future__ import annotations

import dataclasses

import pytest

from sidecar.redact import Redacted
from sidecar.sources.base import SecretMaterial


def test_its_repr_names_the_product_and_version_only() -> None:
    material = SecretMaterial("prod-1", Redacted("s3cret-value"), 4)
    assert repr(material) == "SecretMaterial(product_id='prod-1', version=4)"


def test_it_cannot_be_changed_once_read() -> None:
    material = SecretMaterial("prod-1", Redacted("s3cret-value"), 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        material.version = 5  # type: ignore[misc]
