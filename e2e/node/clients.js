// Redis clients against one endpoint: node-redis on database 1 and ioredis on
// database 2 (SELECT at connect time), each with a MULTI/EXEC transaction.
// Usage: node clients.js PORT. Prints one JSON line; exits non-zero on error.
"use strict";
const { createClient } = require("redis");
const Redis = require("ioredis");

const port = Number(process.argv[2]);
const deadline = setTimeout(() => {
  console.error("clients.js: no result within 20 s");
  process.exit(2);
}, 20000);

(async () => {
  const out = {};
  const nr = createClient({ url: `redis://127.0.0.1:${port}/1` });
  nr.on("error", (e) => console.error("node-redis:", e.message));
  await nr.connect();
  await nr.set("shared", "db1");
  out.nodeRedisMulti = await nr.multi().set("n", "1").incrBy("n", 41).get("n").exec();
  out.nodeRedisGet = await nr.get("shared");
  await nr.quit();

  const io = new Redis({ port, host: "127.0.0.1", db: 2, maxRetriesPerRequest: 1 });
  await io.set("shared", "db2");
  out.ioredisMulti = await io.multi().set("n", "7").incr("n").exec();
  out.ioredisGet = await io.get("shared");
  await io.select(1);
  out.ioredisDb1 = await io.get("shared");
  await io.quit();
  clearTimeout(deadline);
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error("clients.js:", e && e.stack ? e.stack : e);
  process.exit(1);
});
