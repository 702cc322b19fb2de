// One client library through the proxy while migrations swap table t (see
// proto-tests/python/swap_workload.py for the contract): node-postgres named queries or
// postgres.js (prepared statements by default).
//   node swap_workload.js DRIVER URL STOPFILE BASE     DRIVER: pg | postgres.js
const fs = require('fs');

const [driver, url, stop, baseArg] = process.argv.slice(2);
const base = Number(baseArg);
const state = { ops: 0, writes: 0, errors: 0, said: false };

function okRound() {
  state.ops += 1;
  if (!state.said) {
    state.said = true;
    console.log('ready');
  }
}

function failed(e) {
  state.errors += 1;
  console.error(`${driver}: ${e.code || ''} ${e.message}`);
}

async function runPg() {
  const { Client } = require('pg');
  const c = new Client({ connectionString: url });
  await c.connect();
  for (let i = 1; !fs.existsSync(stop); i++) {
    const id = 1 + (i % 50);
    try {
      await c.query('BEGIN');
      const r = await c.query({ name: 'sel', text: 'SELECT * FROM t WHERE id = $1', values: [id] });
      if (Number(r.rows[0].id) !== id) throw new Error(`wrong row ${JSON.stringify(r.rows[0])}`);
      await c.query({ name: 'upd', text: 'UPDATE t SET n = n + 1 WHERE id = $1', values: [id] });
      await c.query({ name: 'ins', text: "INSERT INTO t (id, v, n) VALUES ($1, 'w', 0)", values: [base + i] });
      await c.query('COMMIT');
      state.writes += 1;
      okRound();
      await new Promise((r) => setTimeout(r, 5));
    } catch (e) {
      failed(e);
      await c.query('ROLLBACK').catch(() => {});
    }
  }
  await c.end();
}

async function runPostgresJs() {
  const postgres = require('postgres');
  const sql = postgres(url, { max: 1, prepare: true, onnotice: () => {} });
  for (let i = 1; !fs.existsSync(stop); i++) {
    const id = 1 + (i % 50);
    try {
      await sql.begin(async (tx) => {
        const rows = await tx`SELECT * FROM t WHERE id = ${id}`;
        if (Number(rows[0].id) !== id) throw new Error(`wrong row ${JSON.stringify(rows[0])}`);
        await tx`UPDATE t SET n = n + 1 WHERE id = ${id}`;
        await tx`INSERT INTO t (id, v, n) VALUES (${base + i}, 'w', 0)`;
      });
      state.writes += 1;
      okRound();
      await new Promise((r) => setTimeout(r, 5));
    } catch (e) {
      failed(e);
    }
  }
  await sql.end();
}

(driver === 'pg' ? runPg() : runPostgresJs())
  .then(() => {
    console.log(`done ops=${state.ops} writes=${state.writes} errors=${state.errors}`);
    process.exit(state.errors ? 1 : 0);
  })
  .catch((e) => {
    console.error(e);
    process.exit(2);
  });
