"""`--create`: a table made from the file, its types the narrowest that take every value,
and text wherever a guess could lose data."""

from __future__ import annotations

from pathlib import Path

from helpers import Db

HEADER = "id,big,price,ratio,active,day,at,at_tz,zip,empty,note,us_date,\"Mixed Case\"\n"


def row(i: int) -> str:
    return (
        f"{i},{i * 10**10},{i}.25,{i}.5e-3,{'true' if i % 2 else 'false'},2024-01-{1 + i % 28:02d},"
        f"2024-01-02 03:04:{i % 60:02d},2024-01-02T03:04:05{'+02:00' if i % 2 else 'Z'},0{1000 + i},,"
        f"word {i},01/{1 + i % 12:02d}/2024,{'x' if i == 3 else i}\n"
    )


def column_types(db: Db, table: str) -> dict[str, str]:
    rows = db.sql(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 ORDER BY attnum",
        table,
    )
    return {r[0]: r[1] for r in rows}


def test_create_makes_the_table_from_the_header_with_types_from_the_data_then_loads(db: Db, tmp_path: Path) -> None:
    source = tmp_path / "mixed.csv"
    source.write_text(HEADER + "".join(row(i) for i in range(1, 201)))
    run = db.loader("import", str(source), "-t", "public.mixed", "--create", "--json")
    assert run.code == 0, run.stderr
    assert "created public.mixed" in run.stderr and "CREATE TABLE" in run.stderr  # the DDL is shown
    assert column_types(db, "public.mixed") == {
        "id": "integer",
        "big": "bigint",
        "price": "numeric",
        "ratio": "double precision",
        "active": "boolean",
        "day": "date",
        "at": "timestamp without time zone",
        "at_tz": "timestamp with time zone",
        "zip": "text",  # leading zeros stay
        "empty": "text",  # nothing to go by
        "note": "text",
        "us_date": "text",  # not ISO: day and month are a guess
        "Mixed Case": "text",  # one value is not a number
    }
    assert db.value("SELECT count(*) FROM mixed") == 200
    assert db.value("SELECT zip FROM mixed WHERE id = 7") == "01007"

    again = db.loader("import", str(source), "-t", "public.mixed", "--create")
    assert again.code == 0 and "nothing to do" in again.stderr  # the table exists: nothing is created


def test_create_dry_run_prints_the_table_and_creates_nothing(db: Db, tmp_path: Path) -> None:
    source = tmp_path / "mixed.csv"
    source.write_text(HEADER + "".join(row(i) for i in range(1, 11)))
    run = db.loader("import", str(source), "-t", "mixed", "--create", "--dry-run")
    assert run.code == 0, run.stderr
    assert '"price" numeric' in run.stderr and "nothing was created" in run.stderr
    assert db.value("SELECT to_regclass('mixed')") is None


def test_with_infer_rows_a_later_value_that_does_not_fit_is_rejected_not_truncated(db: Db, tmp_path: Path) -> None:
    source = tmp_path / "late.csv"
    source.write_text("id,n\n" + "".join(f"{i},{i}\n" for i in range(1, 101)) + "101,1.5\n")
    run = db.loader("import", str(source), "-t", "late", "--create", "--infer-rows", "50")
    assert run.code == 3, run.stderr
    assert column_types(db, "late")["n"] == "integer"
    assert "line 102: 22P02" in run.stderr
    assert db.value("SELECT count(*) FROM late") == 100

    whole = db.loader("import", str(source), "-t", "whole", "--create")
    assert whole.code == 0, whole.stderr
    assert column_types(db, "whole")["n"] == "numeric"


def test_create_from_stdin_or_without_names_is_refused(db: Db, tmp_path: Path) -> None:
    run = db.loader("import", "-", "-t", "t", "--create", input=b"id\n1\n")
    assert run.code == 2 and "--create needs a file" in run.stderr
    source = tmp_path / "bare.csv"
    source.write_text("1,2\n")
    bare = db.loader("import", str(source), "-t", "t", "--create", "--no-header")
    assert bare.code == 2 and "--create needs the columns' names" in bare.stderr
