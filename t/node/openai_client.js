#!/usr/bin/env node
// A tiny CLI around the official `openai` npm SDK, used by the tests as an
// independent client.
//
//   node t/node/openai_client.js <base_url> '<json>'
//
// json: {"op": "chat"|"chat_stream"|"completions"|"completions_stream"|
//               "embeddings"|"models",
//        "api_key": "...", "params": {...}, "max_retries": 0,
//        "timeout_ms": 10000, "headers": {...}}
//
// Prints ONE JSON line on stdout:
//   success: {"ok": true, "result": ..., "headers": {...}}
//     (chat_stream / completions_stream: result = {"chunks": [...],
//      "text": "...", "usage": <usage of the last chunk carrying one, or null>,
//      "finish_reason": ...})
//   SDK error: {"ok": false, "error_class": "RateLimitError", "status": 429,
//               "error": <the error object of the body>, "message": "...",
//               "headers": {...}, "partial": <stream so far, for streams>}
// Exit status 0 in both cases; 2 on a usage error.

"use strict";

const { OpenAI } = require("openai");

function usage(msg) {
  process.stderr.write(`openai_client.js: ${msg}\n` +
    "usage: node openai_client.js <base_url> '<json>'\n");
  process.exit(2);
}

function headersToObject(h) {
  if (!h) return {};
  if (typeof h.entries === "function") {
    const out = {};
    for (const [k, v] of h.entries()) out[k] = v;
    return out;
  }
  if (typeof h === "object") return { ...h };
  return {};
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

async function collectStream(stream, state, kind) {
  for await (const chunk of stream) {
    state.chunks.push(chunk);
    if (chunk.usage) state.usage = chunk.usage;
    for (const c of chunk.choices || []) {
      if (kind === "chat") {
        if (c.delta && typeof c.delta.content === "string") state.text += c.delta.content;
      } else if (typeof c.text === "string") {
        state.text += c.text;
      }
      if (c.finish_reason) state.finish_reason = c.finish_reason;
    }
  }
  return state;
}

async function main() {
  const argv = process.argv.slice(2);
  if (argv.length !== 2) usage("expected 2 arguments");
  const baseURL = argv[0];
  let req;
  try {
    req = JSON.parse(argv[1]);
  } catch (e) {
    usage(`bad json: ${e.message}`);
  }
  const op = req.op;
  const params = req.params || {};
  const client = new OpenAI({
    baseURL,
    apiKey: req.api_key || "sk-none",
    maxRetries: req.max_retries ?? 0,
    timeout: req.timeout_ms ?? 10000,
    defaultHeaders: req.headers || {},
  });

  let state = null;
  try {
    let result, response;
    switch (op) {
      case "chat": {
        ({ data: result, response } = await client.chat.completions
          .create({ ...params, stream: false }).withResponse());
        break;
      }
      case "chat_stream":
      case "completions_stream": {
        const kind = op === "chat_stream" ? "chat" : "completions";
        const api = kind === "chat" ? client.chat.completions : client.completions;
        const { data: stream, response: resp } =
          await api.create({ ...params, stream: true }).withResponse();
        response = resp;
        state = { chunks: [], text: "", usage: null, finish_reason: null };
        result = await collectStream(stream, state, kind);
        break;
      }
      case "completions": {
        ({ data: result, response } = await client.completions
          .create({ ...params, stream: false }).withResponse());
        break;
      }
      case "embeddings": {
        ({ data: result, response } = await client.embeddings
          .create(params).withResponse());
        break;
      }
      case "models": {
        const { data: page, response: resp } = await client.models.list().withResponse();
        response = resp;
        result = { object: "list", data: page.data };
        break;
      }
      default:
        usage(`unknown op: ${op}`);
    }
    emit({ ok: true, result, headers: headersToObject(response && response.headers) });
  } catch (err) {
    const out = {
      ok: false,
      error_class: err && err.constructor ? err.constructor.name : typeof err,
      status: err && err.status !== undefined ? err.status : null,
      error: err && err.error !== undefined ? err.error : null,
      message: err && err.message ? String(err.message) : String(err),
      headers: headersToObject(err && err.headers),
    };
    if (err && err.cause && err.cause.message) out.cause = String(err.cause.message);
    if (state) out.partial = state;
    emit(out);
  }
}

main().then(() => process.exit(0), (e) => {
  process.stderr.write(`openai_client.js: ${e && e.stack ? e.stack : e}\n`);
  process.exit(2);
});
