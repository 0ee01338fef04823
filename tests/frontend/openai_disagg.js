// Streams many long and short chats at once through the official OpenAI Node client (openai@4)
// for frontend_disagg_openai. env: BASE (http://host:port/v1), KEY, MODEL, LONG_N, SHORT_N,
// MAX_TOKENS, SPREAD_MS (starts spread evenly over it), LONG_WORDS (filler words in a long chat).
// Every long chat has the same prompt length (fixed-width ids), and so has every short one.
// Prints one JSON line: {long_ok, short_ok, long_prompt_tokens, short_prompt_tokens, failures}.
// A stream counts as completed when it ends with finish_reason "length" after MAX_TOKENS
// tokens (usage.completion_tokens) and its text is not empty.
const OpenAI = require('openai');

const env = process.env;
const LONG_N = Number(env.LONG_N), SHORT_N = Number(env.SHORT_N);
const MAX_TOKENS = Number(env.MAX_TOKENS), SPREAD_MS = Number(env.SPREAD_MS);
const pad = (i) => String(i).padStart(3, '0');
const filler = Array.from({ length: Number(env.LONG_WORDS) }, (_, k) => 'w' + pad(k)).join(' ');

async function one(client, kind, i) {
  const content = kind === 'long' ? `long-${pad(i)} ${filler}` : `short-${pad(i)}`;
  const stream = await client.chat.completions.create({
    model: env.MODEL,
    messages: [{ role: 'user', content }],
    max_tokens: MAX_TOKENS,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = '', finish = null, usage = null;
  for await (const ch of stream) {
    if (ch.object !== 'chat.completion.chunk') throw new Error('bad object ' + ch.object);
    if (ch.choices.length) {
      if (ch.choices[0].delta.content) text += ch.choices[0].delta.content;
      if (ch.choices[0].finish_reason) finish = ch.choices[0].finish_reason;
    }
    if (ch.usage) usage = ch.usage;
  }
  if (finish !== 'length' || !usage || usage.completion_tokens !== MAX_TOKENS || !text)
    throw new Error(`incomplete: finish=${finish} usage=${JSON.stringify(usage)} text=${text.length}`);
  return usage.prompt_tokens;
}

async function main() {
  const client = new OpenAI({ baseURL: env.BASE, apiKey: env.KEY, maxRetries: 0, timeout: 60000 });
  const jobs = [];
  for (let i = 0; i < LONG_N; i++) jobs.push(['long', i]);
  for (let i = 0; i < SHORT_N; i++) jobs.push(['short', i]);
  // interleave long and short so both run through the whole window
  jobs.sort((a, b) => a[1] / (a[0] === 'long' ? LONG_N : SHORT_N) - b[1] / (b[0] === 'long' ? LONG_N : SHORT_N));
  const out = { long_ok: 0, short_ok: 0, long_prompt_tokens: [], short_prompt_tokens: [], failures: [] };
  const step = jobs.length > 1 ? SPREAD_MS / (jobs.length - 1) : 0;
  await Promise.all(jobs.map(([kind, i], k) => new Promise((res) => setTimeout(res, k * step))
    .then(() => one(client, kind, i))
    .then((pt) => {
      out[kind + '_ok']++;
      const set = out[kind + '_prompt_tokens'];
      if (!set.includes(pt)) set.push(pt);
    }, (e) => out.failures.push(`${kind} ${i}: ${e.message || e}`))));
  console.log(JSON.stringify(out));
}
main().catch((e) => { console.error('openai client error:', e); process.exit(1); });
