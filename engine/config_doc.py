"""Render ``config.toml`` as a Markdown reference table (for the README).

    python -m engine.config_doc            # print the table
    python -m engine.config_doc --write    # replace the table between the README markers

Each key's description is the comment line(s) directly above it in config.toml.
"""

from __future__ import annotations

import sys
import tomllib

from engine.config import DEFAULT_CONFIG_PATH

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def reference_table(text: str) -> str:
    values = tomllib.loads(text)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    section, comment = "", []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section, comment = stripped[1:-1], []
        elif stripped.startswith("#"):
            comment.append(stripped.lstrip("# ").strip())
        elif "=" in stripped and section:
            key = stripped.split("=", 1)[0].strip()
            default = values[section][key]
            shown = f'"{default}"' if isinstance(default, str) else str(default).lower() if isinstance(default, bool) else str(default)
            rows.append(f"| `{section}.{key}` | `{shown}` | {' '.join(comment)} |")
            comment = []
        elif not stripped:
            comment = []
    return "\n".join(rows)


def update_readme(readme_text: str, table: str) -> str:
    if BEGIN not in readme_text or END not in readme_text:
        raise ValueError("README has no config-reference markers")
    head, rest = readme_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str]) -> int:
    table = reference_table(DEFAULT_CONFIG_PATH.read_text())
    if "--write" in argv:
        readme = DEFAULT_CONFIG_PATH.with_name("README.md")
        readme.write_text(update_readme(readme.read_text(), table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
