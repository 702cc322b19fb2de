// node-postgres through the proxy: parameters (extended protocol), named prepared statements,
// transactions, errors, notifications. Exits non-zero on any mismatch.
const { Client } = require('pg');
const assert = require('assert');

async function main() {
  const url = process.argv[2];
  const c = new Client({ connectionString: url });
  await c.connect();
  await c.query('CREATE TABLE js (id int PRIMARY KEY, v text)');
  for (let i = 0; i < 50; i++) {
    await c.query({ name: 'ins', text: 'INSERT INTO js VALUES ($1, $2)', values: [i, 'v' + i] });
  }
  const r = await c.query('SELECT count(*)::int AS n, max(v) AS m FROM js WHERE id >= $1', [10]);
  assert.strictEqual(r.rows[0].n, 40);
  await c.query('BEGIN');
  await c.query('UPDATE js SET v = $1 WHERE id = $2', ['changed', 1]);
  await c.query('ROLLBACK');
  const one = await c.query('SELECT v FROM js WHERE id = 1');
  assert.strictEqual(one.rows[0].v, 'v1');
  await assert.rejects(c.query('SELECT 1/0'), (e) => e.code === '22012');
  const after = await c.query('SELECT 7 AS x');
  assert.strictEqual(after.rows[0].x, 7);
  const notified = new Promise((resolve) => c.on('notification', resolve));
  await c.query('LISTEN jsch');
  const other = new Client({ connectionString: url });
  await other.connect();
  await other.query("NOTIFY jsch, 'hello'");
  await other.end();
  const n = await notified;
  assert.strictEqual(n.payload, 'hello');
  const big = await c.query("SELECT repeat('q', 1500000) AS b");
  assert.strictEqual(big.rows[0].b.length, 1500000);
  await c.end();
  console.log('node-postgres ok');
}

main().catch((e) => { console.error(e); process.exit(1); });
