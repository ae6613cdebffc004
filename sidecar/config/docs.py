"""docs/configuration.md, rendered from the settings table:

    python -m sidecar.config.docs > docs/configuration.md

tests/test_configuration_docs.py fails when the file differs from what this prints."""

from __future__ import annotations

import sys

from .table import GROUPS, SETTINGS, Setting

COMMAND = "python -m sidecar.config.docs > docs/configuration.md"

HEADER = f"""\
# Configuration reference

<!-- Generated from sidecar/config/table.py by `{COMMAND}`.
     Do not edit by hand: tests/test_configuration_docs.py fails when this file is stale. -->

Settings come from the environment; a TOML file (`--config FILE` or `REDITUS_SIDECAR_CONFIG`)
may set the same keys in lower case without the prefix (`refresh_interval = 10`) and add named
products. The environment wins. Unknown keys in the file are refused; unknown
`REDITUS_SIDECAR_*` variables are logged as a warning (Kubernetes service-link variables are
ignored). Vault's own `VAULT_*` variables are read from the environment only. Every value is
checked once at start: `serve` and `check` exit 2 on the first bad one with a message naming
the variable (or the file and key) and what it expects.
"""

PRODUCTS = """\
## Several products

Several Reditus products in one app: one `[products.NAME]` table each in the config file.

```toml
# sidecar.toml
refresh_interval = 30

[products.default]
kv_path = "reditus/shop"

[products.shop-eu]
kv_path = "reditus/shop-eu"
secret_key = "eu_secret"        # per product: {keys}
```

A request picks one with `{"userId": "u-1", "product": "shop-eu"}`; keys a product does not
set fall back to the top-level values.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(setting: Setting) -> str:
    if setting.shown is not None:
        default = setting.shown
    elif setting.default is None:
        default = "unset"
    else:
        default = f"`{setting.default}`"
    key = f"`{setting.file_key}`" if setting.file_key else "environment only"
    if setting.product:
        key += ", per product"
    return f"| `{setting.name}` | {key} | {_cell(default)} | {_cell(setting.doc)} |"


def render() -> str:
    """The whole reference, as docs/configuration.md holds it."""
    parts = [HEADER]
    for group, title, intro in GROUPS:
        rows = [_row(setting) for setting in SETTINGS if setting.group == group]
        section = [f"## {title}", ""]
        if intro:
            section += [intro, ""]
        section += ["| variable | file key | default | meaning |", "|---|---|---|---|", *rows]
        parts.append("\n".join(section) + "\n")
    keys = ", ".join(s.file_key for s in SETTINGS if s.product and s.file_key)
    parts.append(PRODUCTS.replace("{keys}", keys))
    return "\n".join(parts)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
