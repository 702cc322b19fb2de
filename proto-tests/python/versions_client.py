"""Code written for the old shape of table `people`, through the proxy, never told about schema
versions: it inserts rows naming `full_name` and reads `full_name` back with a prepared
statement, in a loop until the stop file exists. Prints `ready` after the first round, then
`done ops=N errors=E`; every error goes to stderr. Exits 1 on any error.

    versions_client.py URL STOPFILE
"""
import os
import sys
import time

import psycopg

url, stop = sys.argv[1], sys.argv[2]
ops = errors = 0
with psycopg.connect(url, autocommit=True, prepare_threshold=0) as c:
    while not os.path.exists(stop):
        try:
            c.execute("INSERT INTO people (full_name) VALUES (%s)", (f"py {ops}",))
            row = c.execute(
                "SELECT full_name FROM people WHERE full_name = %s", (f"py {ops}",)
            ).fetchone()
            assert row is not None and row[0] == f"py {ops}", row
            ops += 1
            if ops == 1:
                print("ready", flush=True)
        except Exception as e:  # counted and reported, the loop goes on
            errors += 1
            print(f"psycopg: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        time.sleep(0.005)
print(f"done ops={ops} errors={errors}", flush=True)
sys.exit(1 if errors else 0)
