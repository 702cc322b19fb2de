"""psycopg 3 through the proxy: server-side parameters, prepared statements, pipeline mode,
COPY, notifications, errors and transactions. Exits non-zero on any mismatch."""
import sys

import psycopg

url = sys.argv[1]
with psycopg.connect(url, autocommit=True) as conn:
    conn.execute("CREATE TABLE py (id int PRIMARY KEY, v text)")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO py VALUES (%s, %s)", [(i, f"v{i}") for i in range(100)])
        for _ in range(6):  # psycopg prepares server-side after 5 executions
            cur.execute("SELECT v FROM py WHERE id = %s", (42,), prepare=True)
            assert cur.fetchone() == ("v42",)
    with conn.pipeline():
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM py")
        cur2 = conn.cursor()
        cur2.execute("SELECT max(id) FROM py")
    assert cur.fetchone() == (100,) and cur2.fetchone() == (99,)
    try:
        conn.execute("INSERT INTO py VALUES (1, 'dup')")
        raise SystemExit("duplicate accepted")
    except psycopg.errors.UniqueViolation:
        pass
    with conn.transaction():
        conn.execute("UPDATE py SET v = 'x' WHERE id < 10")
    with conn.cursor().copy("COPY py (id, v) FROM STDIN") as copy:
        for i in range(100, 1100):
            copy.write_row((i, "copied"))
    rows = []
    with conn.cursor().copy("COPY (SELECT id FROM py ORDER BY id) TO STDOUT") as copy:
        for row in copy.rows():
            rows.append(row)
    assert len(rows) == 1100, len(rows)
    conn.execute("LISTEN pych")
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("NOTIFY pych, 'hi'")
    n = next(conn.notifies(timeout=10))
    assert n.payload == "hi", n
    big = conn.execute("SELECT repeat('b', 2000000)").fetchone()[0]
    assert len(big) == 2000000
print("psycopg ok", psycopg.__version__)
