// Code written for the old shape of table `people` (see proto-tests/python/versions_client.py
// for the contract): node-postgres named queries or postgres.js (prepare: true), connected with
// the application_name given, passed the library's own way.
//   node versions_client.js DRIVER URL APPNAME STOPFILE     DRIVER: pg | postgres.js
const fs = require('fs');

const [driver, url, appname, stop] = process.argv.slice(2);
const state = { ops: 0, errors: 0 };
const pause = () => new Promise((r) => setTimeout(r, 5));

function okRound() {
  state.ops += 1;
  if (state.ops === 1) console.log('ready');
}

function failed(e) {
  state.errors += 1;
  console.error(`${driver}: ${e.code || ''} ${e.message}`);
}

async function runPg() {
  const { Client } = require('pg');
  const c = new Client({ connectionString: url, application_name: appname });
  await c.connect();
  while (!fs.existsSync(stop)) {
    const v = `${driver} ${state.ops}`;
    try {
      await c.query({ name: 'ins', text: 'INSERT INTO people (full_name) VALUES ($1)', values: [v] });
      const r = await c.query({
        name: 'sel',
        text: 'SELECT full_name FROM people WHERE full_name = $1',
        values: [v],
      });
      if (r.rows.length !== 1 || r.rows[0].full_name !== v) {
        throw new Error(`wrong rows ${JSON.stringify(r.rows)}`);
      }
      okRound();
    } catch (e) {
      failed(e);
    }
    await pause();
  }
  await c.end();
}

async function runPostgresJs() {
  const postgres = require('postgres');
  const sql = postgres(url, {
    max: 1,
    prepare: true,
    connection: { application_name: appname },
    onnotice: () => {},
  });
  while (!fs.existsSync(stop)) {
    const v = `${driver} ${state.ops}`;
    try {
      await sql`INSERT INTO people (full_name) VALUES (${v})`;
      const rows = await sql`SELECT full_name FROM people WHERE full_name = ${v}`;
      if (rows.length !== 1 || rows[0].full_name !== v) {
        throw new Error(`wrong rows ${JSON.stringify(rows)}`);
      }
      okRound();
    } catch (e) {
      failed(e);
    }
    await pause();
  }
  await sql.end();
}

(driver === 'pg' ? runPg() : runPostgresJs())
  .then(() => {
    console.log(`done ops=${state.ops} errors=${state.errors}`);
    process.exit(state.errors ? 1 : 0);
  })
  .catch((e) => {
    console.error(e);
    process.exit(2);
  });
