// Streams one chat completion through the official OpenAI Node client (openai@4).
// env: BASE (http://host:port/v1), KEY, MODEL, MAX_TOKENS; prints {text, chunks, usage, role}.
const OpenAI = require('openai');

async function main() {
  const client = new OpenAI({ baseURL: process.env.BASE, apiKey: process.env.KEY, maxRetries: 0, timeout: 60000 });
  const stream = await client.chat.completions.create({
    model: process.env.MODEL,
    messages: [
      { role: 'system', content: 'You are a test.' },
      { role: 'user', content: 'Count the tokens, please.' },
    ],
    max_tokens: Number(process.env.MAX_TOKENS),
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = '', chunks = 0, usage = null, role = null;
  for await (const ch of stream) {
    if (ch.object !== 'chat.completion.chunk') throw new Error('bad object ' + ch.object);
    if (ch.choices.length) {
      const d = ch.choices[0].delta;
      if (d.role) role = d.role;
      if (d.content) { text += d.content; chunks++; }
    }
    if (ch.usage) usage = ch.usage;
  }
  console.log(JSON.stringify({ text, chunks, usage, role }));
}
main().catch((e) => { console.error('openai client error:', e); process.exit(1); });
