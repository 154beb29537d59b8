"""Texts the tokenizer tests encode with ours and with the oracle."""

# A varied text set: whitespace runs, digits, code, unicode (accents, combining marks, CJK, RTL, emoji with
# modifiers and ZWJ), special tokens written in the text. Characters absent from SmolLM2's byte alphabet
# (e.g. "\x04") are left out: HF drops them silently, see test_absent_bytes_are_dropped_like_hf.
TEXTS = [
    "Hello, world!",
    "",
    " ",
    "  leading and trailing spaces   ",
    "multiple   internal    spaces",
    "tabs\tand\nnewlines\r\n\n\nmixed \t \n end",
    "digits 0 12 345 6789 3.14159 1,000,000 x2y34 2024-01-15",
    "I'm sure they'll say it's fine, don't you think? We've seen it. YOU'LL",
    "Unicode: café naïve résumé Ångström façade",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353",
    "CJK: 你好，世界！这是一个测试。日本語のテキストとカタカナ 한국어 텍스트",
    "emoji: 😀👍🏽🇺🇸 ❤️ 👨‍👩‍👧‍👦 🚀✨",
    "RTL: مرحبا بالعالم שלום עולם",
    "math: ∑ ∫ √ ≠ ≤ π ∞ ∂x/∂t",
    "zero\u200bwidth\u200djoin and nbsp\u00a0here",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0:\n\t\tpass\n",
    '{"name": "tiny", "values": [1, 2.5, null], "ok": true, "e": "\\u00e9"}',
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "special mid<|endoftext|>text <repo_name> and<|im_end|>  x",
    "Ünïcödé everywhere: Ελληνικά, русский язык, हिन्दी, ไทย",
    "a" * 50 + " " + "ab" * 30,
    "\n\n\n\n",
    "   \t\t  \n  x",
]
