// Encode throughput of the Rust `tokenizers` library (Node binding) on one text, one encode at
// a time, for SECONDS; prints the same JSON line as `kvr-tokenize DIR --bench`.
// usage: node bench.js NODE_MODULES_DIR MODEL_DIR FILE SECONDS
const path = require('path');
const fs = require('fs');
const { Tokenizer } = require(path.join(process.argv[2], '@anush008/tokenizers'));
(async () => {
  const rss0 = process.memoryUsage().rss;
  let t0 = process.hrtime.bigint();
  const tok = Tokenizer.fromFile(path.join(process.argv[3], 'tokenizer.json'));
  const loadS = Number(process.hrtime.bigint() - t0) / 1e9;
  const rss1 = process.memoryUsage().rss;
  const text = fs.readFileSync(process.argv[4], 'utf8');
  const bytes = Buffer.byteLength(text);
  const secs = Number(process.argv[5]);
  let iters = 0, ntok = 0, n = 0, el = 0;
  t0 = process.hrtime.bigint();
  const cpu0 = process.cpuUsage(); // the process's CPU time: the binding encodes on a worker thread
  // prompts of ~4 KiB (whole lines), one encode each, as kvr-tokenize --bench does
  const buf = Buffer.from(text);
  const chunks = [];
  for (let a = 0; a < buf.length;) {
    let b = Math.min(a + 4096, buf.length);
    while (b < buf.length && buf[b - 1] !== 10) b++;
    chunks.push(buf.subarray(a, b).toString('utf8'));
    a = b;
  }
  do {
    n = 0;
    for (const c of chunks) n += (await tok.encode(c, null, { addSpecialTokens: false })).getIds().length;
    ntok += n; iters++;
    el = Number(process.hrtime.bigint() - t0) / 1e9;
  } while (el < secs);
  const cu = process.cpuUsage(cpu0), cpu = (cu.user + cu.system) / 1e6;
  console.log(JSON.stringify({ impl: 'rust-tokenizers', bytes, tokens: n,
    MBps: +(bytes * iters / el / 1e6).toFixed(2), tokens_per_s: Math.round(ntok / el),
    MBps_cpu: +(bytes * iters / cpu / 1e6).toFixed(2), tokens_per_cpu_s: Math.round(ntok / cpu),
    load_s: +loadS.toFixed(2), rss_mib: +((rss1 - rss0) / 1048576).toFixed(1) }));
})().catch((e) => { console.error(e); process.exit(1); });
