"""One client library through the proxy while migrations swap table t: a transaction with a
prepared `SELECT *`, an UPDATE of an existing row and an INSERT of a row in this client's own
id range, in a loop until the stop file exists. Prints `ready` after the first round, then
`done ops=N writes=W errors=E`; every error goes to stderr. Exits 1 on any error.

    swap_workload.py DRIVER URL STOPFILE BASE
DRIVER: psycopg | asyncpg | asyncpg-unnamed | sqlalchemy-psycopg | sqlalchemy-asyncpg
"""
import asyncio
import os
import sys
import time

driver, url, stop, base = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
SELECT = "SELECT * FROM t WHERE id = {}"
PAUSE = 0.005  # between rounds: seven clients share two cores with the server
state = {"ops": 0, "writes": 0, "errors": 0, "said": False}


def ok_round():
    time.sleep(PAUSE)
    state["ops"] += 1
    if not state["said"]:
        state["said"] = True
        print("ready", flush=True)


def failed(e):
    state["errors"] += 1
    print(f"{driver}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def run_psycopg():
    import psycopg

    with psycopg.connect(url, autocommit=True, prepare_threshold=0) as c:
        i = 0
        while not os.path.exists(stop):
            i += 1
            try:
                with c.transaction():
                    row = c.execute(SELECT.format("%s"), (1 + i % 50,), prepare=True).fetchone()
                    assert row is not None and row[0] == 1 + i % 50, row
                    c.execute("UPDATE t SET n = n + 1 WHERE id = %s", (1 + i % 50,), prepare=True)
                    c.execute("INSERT INTO t (id, v, n) VALUES (%s, 'w', 0)", (base + i,), prepare=True)
                state["writes"] += 1
                ok_round()
            except Exception as e:  # noqa: BLE001 - every error counts
                failed(e)


async def asyncpg_loop(c, fetchrow, in_transaction):
    """Rounds on asyncpg connection `c` until the stop file exists; `fetchrow(id)` reads a row."""
    i = 0
    while not os.path.exists(stop):
        i += 1
        try:
            if in_transaction:
                async with c.transaction():
                    await asyncpg_round(c, fetchrow, i)
            else:
                await asyncpg_round(c, fetchrow, i)
            state["writes"] += 1
            ok_round()
        except Exception as e:  # noqa: BLE001
            failed(e)
    await c.close()


async def asyncpg_round(c, fetchrow, i):
    row = await fetchrow(1 + i % 50)
    assert row is not None and row["id"] == 1 + i % 50, row
    await c.execute("UPDATE t SET n = n + 1 WHERE id = $1", 1 + i % 50)
    await c.execute("INSERT INTO t (id, v, n) VALUES ($1, 'w', 0)", base + i)


async def run_asyncpg():
    import asyncpg

    c = await asyncpg.connect(url)
    sel = await c.prepare(SELECT.format("$1"))
    await asyncpg_loop(c, sel.fetchrow, in_transaction=True)


async def run_asyncpg_unnamed():
    """asyncpg without its statement cache (as behind a pooler in transaction mode): every
    query is the unnamed statement, prepared (Parse, Describe, Sync) and then run (Bind,
    Execute, Sync) in two round trips, outside any transaction block."""
    import asyncpg

    c = await asyncpg.connect(url, statement_cache_size=0)
    await asyncpg_loop(c, lambda k: c.fetchrow(SELECT.format("$1"), k), in_transaction=False)


def sqlalchemy_url(dialect):
    return url.replace("postgres://", f"postgresql+{dialect}://", 1).replace(
        "postgresql://", f"postgresql+{dialect}://", 1
    )


def run_sqlalchemy_psycopg():
    from sqlalchemy import create_engine, text

    eng = create_engine(sqlalchemy_url("psycopg"), connect_args={"prepare_threshold": 1})
    sel = text(SELECT.format(":id"))
    upd = text("UPDATE t SET n = n + 1 WHERE id = :id")
    ins = text("INSERT INTO t (id, v, n) VALUES (:id, 'w', 0)")
    with eng.connect() as c:
        i = 0
        while not os.path.exists(stop):
            i += 1
            try:
                row = c.execute(sel, {"id": 1 + i % 50}).mappings().first()
                assert row is not None and row["id"] == 1 + i % 50, row
                c.execute(upd, {"id": 1 + i % 50})
                c.execute(ins, {"id": base + i})
                c.commit()
                state["writes"] += 1
                ok_round()
            except Exception as e:  # noqa: BLE001
                c.rollback()
                failed(e)


async def run_sqlalchemy_asyncpg():
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    eng = create_async_engine(sqlalchemy_url("asyncpg"))
    sel = text(SELECT.format(":id"))
    upd = text("UPDATE t SET n = n + 1 WHERE id = :id")
    ins = text("INSERT INTO t (id, v, n) VALUES (:id, 'w', 0)")
    async with eng.connect() as c:
        i = 0
        while not os.path.exists(stop):
            i += 1
            try:
                row = (await c.execute(sel, {"id": 1 + i % 50})).mappings().first()
                assert row is not None and row["id"] == 1 + i % 50, row
                await c.execute(upd, {"id": 1 + i % 50})
                await c.execute(ins, {"id": base + i})
                await c.commit()
                state["writes"] += 1
                ok_round()
            except Exception as e:  # noqa: BLE001
                await c.rollback()
                failed(e)
    await eng.dispose()


if driver == "psycopg":
    run_psycopg()
elif driver == "asyncpg":
    asyncio.run(run_asyncpg())
elif driver == "asyncpg-unnamed":
    asyncio.run(run_asyncpg_unnamed())
elif driver == "sqlalchemy-psycopg":
    run_sqlalchemy_psycopg()
elif driver == "sqlalchemy-asyncpg":
    asyncio.run(run_sqlalchemy_asyncpg())
else:
    sys.exit(f"unknown driver {driver}")
print(f"done ops={state['ops']} writes={state['writes']} errors={state['errors']}", flush=True)
sys.exit(1 if state["errors"] else 0)
