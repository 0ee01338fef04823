#!/usr/bin/env python3
"""Writes the tokenizer parity corpus (a JSON list of strings) to stdout.

Hand-written texts in many scripts plus generated ones (numbers of every length, whitespace
runs, special tokens inside text, long inputs). Deterministic: no randomness without a seed."""
import json
import random
import sys

texts = [
    "", " ", "  ", "\n", "\n\n", "\t", " \n ", "Hello world", "Hello, world!", " Hello",
    "hello  world", "Hello\nworld", "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we've done, I'd think. DON'T SHOUT! It'S", "can't won't",
    "Grüße aus Köln – naïve café résumé", "Ελληνικά κείμενα με τόνους", "Привет, мир! Как дела?",
    "日本語のテキストです。漢字とひらがなとカタカナ。", "中文文本：你好，世界！这是一个测试。",
    "한국어 텍스트입니다. 안녕하세요!", "ภาษาไทยไม่มีช่องว่างระหว่างคำ", "हिन्दी में पाठ, नमस्ते दुनिया",
    "العربية: مرحبا بالعالم", "עברית: שלום עולם", "Tiếng Việt có dấu: Xin chào thế giới",
    "ქართული ენა", "Հայերեն", "አማርኛ", "தமிழ் உரை", "বাংলা লেখা", "ᚠᚢᚦᚨᚱᚲ",
    "😀😃😄 emoji 👍🏽 family 👨‍👩‍👧‍👦 flags 🇩🇪🇯🇵 keycap 1️⃣", "🤖🧠💡🚀",
    "e\u0301 vs é, A\u030a vs Å, \u1100\u1161\u11a8 hangul jamo",
    # U+11A7 after an LV syllable: utf8proc's NFC drops it, the library keeps it
    "\uac00\u11a7 \uac00\u11a7\u1161 \uac00\u11a7\u0301 \u1100\u1161\u11a7", "Zalgo: Z\u0351\u0360a\u0352l\u0353g\u0354o",
    "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, ① circled, ² superscript, ½ fraction",
    "\u00a0nbsp\u00a0here\u2003em space\u3000ideographic space\u200bzero width",
    "line\r\nwindows\rmac\u2028sep\u2029para\u0085nel",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "int main(void) { printf(\"%d\\n\", 42); return 0; }",
    "for (let i = 0; i < 10; i++) { console.log(`i=${i}`); }",
    "SELECT * FROM users WHERE id = 1234567890 AND name LIKE '%foo%';",
    "<html><body><div class=\"x\">Hi &amp; bye</div></body></html>",
    "{\"key\": [1, 2.5, -3e10, null, true], \"nested\": {\"a\": \"b\"}}",
    "https://example.com/path?q=1&r=two#frag user@mail.example.org",
    "    indented with spaces", "trailing spaces    ", "tabs\t\tand\t\ttabs",
    "!!!???...,,,;;;:::---___===+++***", "$100.00 €50 ¥1000 £20 ₹500",
    "a" * 300, "ab" * 200, " " * 100, "\n" * 50, "x\n\n\ny  \n  z",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|endoftext|>",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "half <|im_start tag and <|im_end|>> and <|im_start|><|im_start|> twice",
    "<think>\nreasoning\n</think>\n\nanswer", "<tool_call>{\"name\": \"f\"}</tool_call>",
    "<pad><eos><unk> <mask> [multimodal] <start_of_image>",
    "Numbers: 0 1 12 123 1234 12345 123456 1234567 12345678 123456789 1234567890",
    "3.14159265358979323846 -0.001 1e-9 0x1F 0b1010 1,000,000 1_000_000",
    "٠١٢٣٤٥٦٧٨٩ ०१२३ 〇一二三", "Ⅻ roman, ⅷ small roman",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE", "’s curly apostrophes ‘quoted’ “double”",
    "mixed中文and English混合text", "CamelCaseIdentifier snake_case_identifier kebab-case",
    "  leading and trailing  ", "a\u0300\u0301\u0302\u0303\u0304 many combining marks",
    "\u212b angstrom sign, \u2126 ohm sign, \u00c5 precomposed",  # NFC changes the first two
    "\ufeffBOM at start", "private use \ue000\uf8ff", "astral \U0001d400\U0001d401 math bold",
    "A" * 1000 + " " + "b c " * 500,
]
for n in range(1, 41):
    texts.append("".join(str((i * 7 + n) % 10) for i in range(n)))
    texts.append("x" + "9" * n + "y")
for n in range(1, 20):
    texts.append(" " * n + "word" + "\t" * (n % 4) + "\n" * (n % 3))
rnd = random.Random(12)
alphabet = ("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ 0123456789 .,;:!?'\"()[]{}<>\n\t"
            "éàüößçñ中文日本語한국어Привет😀👍🏽\u0301")
for _ in range(40):
    texts.append("".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 200))))
specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>",
            "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<think>", "</think>"]
for _ in range(20):
    parts = []
    for _ in range(rnd.randint(2, 8)):
        parts.append(rnd.choice(specials) if rnd.random() < 0.4 else
                     "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 30))))
    texts.append("".join(parts))
long_text = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. 日本語の文章も混ぜる。 "
             "Numbers 1234567 and code `x = y + 1;`\n") * 200
texts.append(long_text)
texts.append("中文没有空格的长文本" * 300)
json.dump(texts, sys.stdout, ensure_ascii=False)
