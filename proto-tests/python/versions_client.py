"""Code written for the old shape of table `people`, through the proxy, never told about schema
versions: it inserts rows naming `full_name` (the value is `DRIVER N`) and reads `full_name`
back with a prepared statement, in a loop until the stop file exists. It connects with the
application_name given, passed the driver's own way, and nothing else marks it as old code.
Prints `ready` after the first round, then `done ops=N errors=E`; every error goes to stderr.
Exits 1 on any error.

    versions_client.py DRIVER URL APPNAME STOPFILE
DRIVER: psycopg (prepare_threshold=0: server-side statements from the first execution)
      | asyncpg (its default statement cache)
"""
import asyncio
import os
import sys
import time

driver, url, appname, stop = sys.argv[1:5]
INSERT = "INSERT INTO people (full_name) VALUES ({})"
SELECT = "SELECT full_name FROM people WHERE full_name = {}"
PAUSE = 0.005  # between rounds: several clients share the cores with the server
state = {"ops": 0, "errors": 0}


def ok_round():
    state["ops"] += 1
    if state["ops"] == 1:
        print("ready", flush=True)


def failed(e):
    state["errors"] += 1
    print(f"{driver}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def run_psycopg():
    import psycopg

    with psycopg.connect(
        url, autocommit=True, prepare_threshold=0, application_name=appname
    ) as c:
        while not os.path.exists(stop):
            v = f"{driver} {state['ops']}"
            try:
                c.execute(INSERT.format("%s"), (v,))
                row = c.execute(SELECT.format("%s"), (v,)).fetchone()
                assert row is not None and row[0] == v, row
                ok_round()
            except Exception as e:  # noqa: BLE001 - counted and reported, the loop goes on
                failed(e)
            time.sleep(PAUSE)


async def run_asyncpg():
    import asyncpg

    c = await asyncpg.connect(url, server_settings={"application_name": appname})
    while not os.path.exists(stop):
        v = f"{driver} {state['ops']}"
        try:
            await c.execute(INSERT.format("$1"), v)
            row = await c.fetchrow(SELECT.format("$1"), v)
            assert row is not None and row["full_name"] == v, row
            ok_round()
        except Exception as e:  # noqa: BLE001
            failed(e)
        await asyncio.sleep(PAUSE)
    await c.close()


if driver == "psycopg":
    run_psycopg()
elif driver == "asyncpg":
    asyncio.run(run_asyncpg())
else:
    sys.exit(f"unknown driver {driver}")
print(f"done ops={state['ops']} errors={state['errors']}", flush=True)
sys.exit(1 if state["errors"] else 0)
