"""Fleet questions over a store: a summary per image, rare values, and two-image diffs.

Each function takes a DuckDB connection from ``Store.connect()`` and returns
``(columns, rows)`` so that the CLI can print it as a table, CSV or JSON and tests can
compare plain values.
"""

from __future__ import annotations

from typing import Any

from .spec import COUNT_TABLES, IMAGE_TASK
from .store import ROW_META

Result = tuple[list[str], list[tuple[Any, ...]]]


class AnalysisError(ValueError):
    """A plugin, column or image the store does not hold."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def tables(con: Any) -> set[str]:
    return {row[0] for row in con.sql("SELECT view_name FROM duckdb_views()").fetchall()}


def plugin_columns(con: Any, plugin: str) -> list[str]:
    """The plugin's own columns (without image and triage's row metadata)."""
    if plugin not in tables(con):
        known = sorted(t for t in tables(con) if "." in t)
        raise AnalysisError(f"no table {plugin!r} in this store (plugins: {', '.join(known)})")
    names = [row[0] for row in con.sql(f"DESCRIBE {_q(plugin)}").fetchall()]
    return [n for n in names if n != "image" and n not in ROW_META]


def _column(con: Any, plugin: str, wanted: str) -> str:
    """A column by name, case-insensitively (``comm`` finds ``COMM``)."""
    columns = plugin_columns(con, plugin)
    for name in columns:
        if name == wanted:
            return name
    matches = [n for n in columns if n.lower() == wanted.lower()]
    if len(matches) == 1:
        return matches[0]
    raise AnalysisError(f"{plugin} has no column {wanted!r} (columns: {', '.join(columns)})")


def images_with(con: Any, plugin: str) -> list[str]:
    """Images whose latest attempt of ``plugin`` succeeded."""
    rows = con.execute(
        "SELECT image FROM tasks WHERE plugin = ? AND status = 'ok' ORDER BY image", [plugin]
    ).fetchall()
    return [r[0] for r in rows]


def rare(
    con: Any, plugin: str, column: str, max_images: int | None = None, limit: int | None = 100
) -> Result:
    """Least frequency of occurrence: each value of ``column`` with the number of images it
    appears in and which, rarest first.  Default: values missing from at least one image."""
    name = _column(con, plugin, column)
    total = len(images_with(con, plugin))
    bound = total - 1 if max_images is None else max_images
    sql = (
        f"SELECT {_q(name)} AS value, count(DISTINCT image) AS images, "
        f"string_agg(DISTINCT image, ', ' ORDER BY image) AS in_images, count(*) AS rows "
        f"FROM {_q(plugin)} GROUP BY 1 HAVING count(DISTINCT image) <= ? "
        f"ORDER BY images, value NULLS FIRST"
    )
    if limit:
        sql += f" LIMIT {int(limit)}"
    rows = con.execute(sql, [bound]).fetchall()
    return [name, f"images (of {total})", "in images", "rows"], rows


def diff(
    con: Any, plugin: str, image_a: str, image_b: str, columns: list[str] | None = None
) -> Result:
    """Rows of ``plugin`` in one image and not the other (as multisets: a process listed
    twice in A and once in B shows once), compared on ``columns`` (default: all of the
    plugin's own columns)."""
    chosen = [_column(con, plugin, c) for c in columns] if columns else plugin_columns(con, plugin)
    have = set(images_with(con, plugin))
    for image in (image_a, image_b):
        if image not in have:
            raise AnalysisError(
                f"{image!r} has no successful {plugin} run in this store "
                f"(images with one: {', '.join(sorted(have)) or 'none'})"
            )
    cols = ", ".join(_q(c) for c in chosen)
    side = f"SELECT {cols} FROM {_q(plugin)} WHERE image = ?"
    sql = (
        f"SELECT ? AS only_in, * FROM ({side} EXCEPT ALL {side}) "
        f"UNION ALL SELECT ? AS only_in, * FROM ({side} EXCEPT ALL {side})"
    )
    rows = con.execute(sql, [image_a, image_a, image_b, image_b, image_b, image_a]).fetchall()
    rows.sort(key=lambda r: (r[0] != image_a, [(v is None, str(v)) for v in r[1:]]))
    return ["only_in", *chosen], rows


def summary(con: Any) -> Result:
    """One row per image: identity, OS, kernel, Xen type, counts, tasks and errors."""
    images = [
        r[0]
        for r in con.sql(
            "SELECT image FROM (SELECT image FROM tasks UNION SELECT image FROM images) "
            "ORDER BY image"
        ).fetchall()
    ]
    facts = {
        r[0]: r[1:]
        for r in con.sql(
            "SELECT image, mode(os), mode(kernel), bool_or(xen), "
            "count(*) FILTER (WHERE status = 'ok' AND plugin <> 'image'), "
            "count(*) FILTER (WHERE status = 'error') "
            "FROM tasks GROUP BY image"
        ).fetchall()
    }
    identity = {
        r[0]: r[1:] for r in con.sql("SELECT image, image_sha256, size FROM images").fetchall()
    }
    views = tables(con)
    xen_type: dict[str, str] = {}
    if "xen.info" in views:
        for image, value in con.sql(
            'SELECT image, "Value" FROM "xen.info" WHERE "Group" = \'guest\' AND "Field" = \'type\''
        ).fetchall():
            xen_type[image] = str(value)
    counts = [_counts(con, views, kind) for kind in range(3)]
    rows = []
    for image in images:
        os_name, kernel, xen, ok, errors = facts.get(image, (None, None, None, 0, 0))
        sha, size = identity.get(image, (None, None))
        xen_text = xen_type.get(image) or ("yes" if xen else ("no" if xen is not None else None))
        rows.append(
            (
                image,
                os_name,
                _short_kernel(kernel),
                xen_text,
                *(c.get(image) for c in counts),
                ok,
                errors,
                size,
                sha[:16] if sha else None,
            )
        )
    columns = ["image", "os", "kernel", "xen", "processes", "modules", "sockets"]
    return columns + ["plugins ok", "errors", "size", "sha256 (prefix)"], rows


def _counts(con: Any, views: set[str], kind: int) -> dict[str, int]:
    """Rows per image in the OS's process / module / socket table; absent (None) where the
    plugin did not succeed, 0 where it ran and found nothing."""
    out: dict[str, int] = {}
    for tables_for_os in COUNT_TABLES.values():
        plugin = tables_for_os[kind]
        for image in images_with(con, plugin):
            out[image] = 0
        if plugin in views:
            for image, n in con.sql(
                f"SELECT image, count(*) FROM {_q(plugin)} GROUP BY image"
            ).fetchall():
                out[image] = n
    return out


def _short_kernel(banner: str | None) -> str | None:
    """``Linux version 6.1.0-47-cloud-amd64 (...) ...`` -> ``Linux 6.1.0-47-cloud-amd64``."""
    if not banner:
        return None
    parts = banner.split()
    if len(parts) >= 3 and parts[1] == "version":
        return f"{parts[0]} {parts[2]}"
    return banner[:60]


def errors(con: Any) -> Result:
    rows = con.sql(
        "SELECT image, plugin, error_class, message FROM errors ORDER BY image, plugin"
    ).fetchall()
    return ["image", "plugin", "error_class", "message"], rows


__all__ = ["AnalysisError", "IMAGE_TASK", "diff", "errors", "rare", "summary"]
