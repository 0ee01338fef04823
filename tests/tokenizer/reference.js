// Reference ids and texts from the Rust `tokenizers` library (Node binding
// @anush008/tokenizers), in the same line format as kvr-tokenize prints.
// usage: node reference.js NODE_MODULES_DIR MODEL_DIR corpus.json
const path = require('path');
const fs = require('fs');
const { Tokenizer } = require(path.join(process.argv[2], '@anush008/tokenizers'));
(async () => {
  const tok = Tokenizer.fromFile(path.join(process.argv[3], 'tokenizer.json'));
  const texts = JSON.parse(fs.readFileSync(process.argv[4], 'utf8'));
  const out = [];
  for (const t of texts) {
    const a = (await tok.encode(t, null, { addSpecialTokens: false })).getIds();
    const b = (await tok.encode(t, null, { addSpecialTokens: true })).getIds();
    out.push(JSON.stringify({ ids: a, ids_special: b, decoded: await tok.decode(b, false),
                              decoded_skip: await tok.decode(b, true) }));
  }
  process.stdout.write(out.join('\n') + '\n');
})().catch((e) => { console.error(e); process.exit(1); });
