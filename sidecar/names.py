"""Names every layer may need and none owns: the environment prefix and the product a
sidecar signs for when no `[products]` table names one. A leaf: it imports nothing."""

from __future__ import annotations

#: every environment variable of the sidecar starts with it
PREFIX = "REDITUS_SIDECAR_"
#: the one product of a sidecar without `[products]` tables (and of transit mode)
DEFAULT_PRODUCT = "default"
