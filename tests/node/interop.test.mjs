// warren speaks the protocol of docs/protocol.md with programs that know nothing else: Node.js and amqplib.
//
// The caller and the responder below are written from docs/protocol.md alone (they use no warren code), then
// pointed at warren's worker and CLI. Run with tests/node/run (it installs amqplib into tests/node/node_modules).
// Needs the debug binaries (or WARREN_BIN_DIR) and RabbitMQ at WARREN_BROKER_URI.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import amqp from 'amqplib';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BROKER_URI = process.env.WARREN_BROKER_URI || 'amqp://guest:guest@127.0.0.1:5672/%2f';
const BIN_DIR = path.resolve(
  process.env.WARREN_BIN_DIR || path.join(process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target'), 'debug'),
);
// Every test gets this long; every wait inside a test has a shorter bound of its own.
const TEST_TIMEOUT_MS = 60_000;

// --- the caller and responder of docs/protocol.md, in Node --------------------------------------------------------

const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';

/** The service replied with an error object. */
class RemoteError extends Error {
  constructor(code, message, details) {
    super(`${code}: ${message}`);
    Object.assign(this, { code, remoteMessage: message, details });
  }
}

/** No queue of that name: the broker returned the request (basic.return). */
class NoSuchService extends Error {
  constructor(queue, replyCode, replyText) {
    super(`no queue ${queue}: ${replyCode} ${replyText}`);
    Object.assign(this, { queue, replyCode, replyText });
  }
}

class CallTimeout extends Error {}

/** Calls warren services over one channel, replies via direct reply-to; no publisher confirms. */
class WarrenCaller {
  static async open(connection) {
    const channel = await connection.createChannel();
    channel.on('error', () => {}); // a broker-closed channel fails the calls through their timeouts
    const caller = new WarrenCaller(channel);
    // Requests are published `mandatory`: a request no queue takes comes back here.
    channel.on('return', (message) => caller.#settle(message, 'return'));
    // Direct reply-to: consume (no-ack) on the same channel, before publishing.
    await channel.consume(DIRECT_REPLY_TO, (message) => caller.#settle(message, 'reply'), { noAck: true });
    return caller;
  }

  constructor(channel) {
    this.channel = channel;
    this.waiting = new Map(); // correlation id -> settle(message, kind)
  }

  #settle(message, kind) {
    if (!message) return; // the broker cancelled the consumer
    // Only the first reply to a call we wait for counts; late, duplicate and unknown replies are dropped.
    const settle = this.waiting.get(message.properties.correlationId);
    if (!settle) return;
    this.waiting.delete(message.properties.correlationId);
    settle(message, kind);
  }

  /**
   * Publishes one request and returns the reply message (properties and body, undecoded). `method` null calls the
   * default method; `body` is the request body as is (the JSON of the params for a normal call); `headers` are added
   * to x-deadline (and may replace it).
   */
  callRaw(queue, method, body, { timeoutMs = 10_000, headers = {} } = {}) {
    const correlationId = randomUUID();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(correlationId);
        reject(new CallTimeout(`no reply from ${queue} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.set(correlationId, (message, kind) => {
        clearTimeout(timer);
        if (kind === 'return') {
          const { routingKey, replyCode, replyText } = message.fields;
          reject(new NoSuchService(routingKey, replyCode, replyText));
        } else {
          resolve(message);
        }
      });
      this.channel.publish('', queue, Buffer.from(body), {
        mandatory: true,
        contentType: 'application/json',
        type: method ?? undefined,
        correlationId,
        replyTo: DIRECT_REPLY_TO,
        messageId: correlationId,
        expiration: String(timeoutMs),
        // An integer: amqplib encodes a JS number this large as a signed 64-bit `l`.
        headers: { 'x-deadline': Date.now() + timeoutMs, ...headers },
      });
    });
  }

  /** Calls `method` (null = the default method) with `params` and returns its decoded result. */
  async call(queue, method, params, options) {
    return decodeReply(await this.callRaw(queue, method, JSON.stringify(params), options));
  }
}

/** A reply's result, or a RemoteError for an error reply. A reply without x-status is `ok`. */
function decodeReply(message) {
  const status = message.properties.headers?.['x-status'] ?? 'ok';
  const body = message.content.toString('utf8');
  if (status === 'error') {
    const error = JSON.parse(body);
    throw new RemoteError(error.code, error.message, error.details);
  }
  return body.trim() ? JSON.parse(body) : null;
}

/** Throw from a method when the params do not fit: the reply is `bad_request`. */
class BadParams extends Error {}

/** Throw from a method to reply `handler_error` with a message and optional details. */
class HandlerError extends Error {
  constructor(message, details) {
    super(message);
    this.details = details;
  }
}

/** The outcome of one request: [x-status, result or error object]. `methods` maps names to (params) => result. */
function outcome(message, methods, defaultMethod) {
  const { type, headers, contentType } = message.properties;
  const method = type || defaultMethod;
  const deadline = headers?.['x-deadline'];
  if (deadline !== undefined && Number(deadline) < Date.now()) {
    return ['error', { code: 'deadline_exceeded', message: "the caller's deadline passed" }];
  }
  if (!method || !Object.hasOwn(methods, method)) {
    return ['error', { code: 'unknown_method', message: `no method named ${JSON.stringify(method ?? null)}` }];
  }
  const mediaType = (contentType || 'application/json').split(';')[0].trim().toLowerCase();
  if (mediaType !== 'application/json') {
    return ['error', { code: 'bad_request', message: `unsupported content type ${mediaType}` }];
  }
  let params;
  try {
    const body = message.content.toString('utf8');
    params = body.trim() ? JSON.parse(body) : null;
  } catch (error) {
    return ['error', { code: 'bad_request', message: `the body is not JSON: ${error.message}` }];
  }
  try {
    return ['ok', methods[method](params) ?? null];
  } catch (error) {
    if (error instanceof BadParams) return ['error', { code: 'bad_request', message: error.message }];
    if (error instanceof HandlerError) {
      return ['error', { code: 'handler_error', message: error.message, details: error.details }];
    }
    return ['error', { code: 'handler_error', message: String(error) }];
  }
}

/** Answers warren calls on `queue` with `methods` until the consumer is cancelled; returns the consumer tag. */
async function serve(channel, queue, methods, { defaultMethod, prefetch = 32 } = {}) {
  await channel.prefetch(prefetch);
  const { consumerTag } = await channel.consume(
    queue,
    (message) => {
      if (!message) return; // the broker cancelled the consumer
      const [status, result] = outcome(message, methods, defaultMethod);
      const { replyTo, correlationId, headers = {} } = message.properties;
      if (replyTo) {
        // No reply_to: a one-way call, no reply even for errors.
        const replyHeaders = { 'x-status': status };
        for (const name of ['traceparent', 'tracestate']) {
          if (headers[name] !== undefined) replyHeaders[name] = headers[name];
        }
        channel.publish('', replyTo, Buffer.from(JSON.stringify(result)), {
          contentType: 'application/json',
          correlationId,
          headers: replyHeaders,
        });
      }
      // Ack only after replying: a crash before this line gets the request redelivered.
      channel.ack(message);
    },
    { noAck: false },
  );
  return consumerTag;
}

/** The arguments docs/protocol.md gives a request queue (quorum, the default delivery limit). */
function requestQueueArguments(queue) {
  return {
    'x-queue-type': 'quorum',
    'x-dead-letter-exchange': '',
    'x-dead-letter-routing-key': `${queue}.dead`,
    'x-delivery-limit': 5,
  };
}

// --- fixtures ---------------------------------------------------------------------------------------------------

function binary(name) {
  const file = path.join(BIN_DIR, name);
  if (!existsSync(file)) {
    throw new Error(
      `${file} does not exist: build it (cargo build -p warren-client -p warren-worker) ` +
        'or point WARREN_BIN_DIR at the binaries',
    );
  }
  return file;
}

function uniqueQueue(what) {
  return `warren-node-test.${what}.${randomUUID().replaceAll('-', '').slice(0, 12)}`;
}

/**
 * Returns `defer(fn)`: `fn` runs when the test ends, in reverse order of deferral (node:test runs its own t.after
 * hooks in the order they were added). A failing clean-up fails the test after the others have run.
 */
function cleanups(t) {
  const stack = [];
  t.after(async () => {
    let failure;
    for (const fn of stack.reverse()) {
      try {
        await fn();
      } catch (error) {
        failure ??= error;
      }
    }
    if (failure) throw failure;
  });
  return (fn) => stack.push(fn);
}

/** A connection closed when the test ends. */
async function connect(defer) {
  const connection = await amqp.connect(BROKER_URI);
  connection.on('error', () => {}); // surfaced by the operations that fail
  defer(() => connection.close());
  return connection;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The queue's consumers, or null while it does not exist (a passive declare answers at once). */
async function consumerCount(connection, queue) {
  const channel = await connection.createChannel();
  channel.on('error', () => {}); // a 404 closes the channel; checkQueue rejects with it
  try {
    return (await channel.checkQueue(queue)).consumerCount;
  } catch (error) {
    if (error.code === 404) return null;
    throw error;
  } finally {
    await channel.close().catch(() => {});
  }
}

/** Deletes queues on a channel of its own (the test's channels may be closed by then). */
async function deleteQueues(connection, ...queues) {
  const channel = await connection.createChannel();
  channel.on('error', () => {});
  for (const queue of queues) await channel.deleteQueue(queue);
  await channel.close();
}

/**
 * Starts `warren-worker --handler builtin --declare` on a fresh queue, waits until it consumes and returns the queue.
 * When the test ends the worker gets SIGTERM (SIGKILL after 15 s) and its queue and dead-letter queue are deleted.
 */
async function startWorker(defer, connection, ...extraArgs) {
  const queue = uniqueQueue('worker');
  const child = spawn(
    binary('warren-worker'),
    ['--queue', queue, '--handler', 'builtin', '--declare', '--broker-uri', BROKER_URI,
      '--metrics-addr', '127.0.0.1:0', ...extraArgs],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let log = '';
  child.stdout.on('data', (chunk) => { log += chunk; });
  child.stderr.on('data', (chunk) => { log += chunk; });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  let running = true;
  exited.then(() => { running = false; });
  defer(async () => {
    if (running) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      await exited;
      clearTimeout(timer);
    }
    await deleteQueues(connection, queue, `${queue}.dead`);
  });
  const deadline = Date.now() + 30_000;
  while (((await consumerCount(connection, queue)) ?? 0) < 1) {
    if (!running || Date.now() > deadline) {
      assert.fail(`warren-worker did not start consuming ${queue}:\n${log}`);
    }
    await sleep(50);
  }
  return queue;
}

/**
 * Declares a request queue (and its dead-letter queue) with the arguments of docs/protocol.md and answers it with
 * `serve`; returns the queue. Both queues are deleted when the test ends.
 */
async function startNodeResponder(defer, connection, methods, options) {
  const queue = uniqueQueue('node-responder');
  const channel = await connection.createChannel();
  channel.on('error', () => {});
  defer(() => deleteQueues(connection, queue, `${queue}.dead`));
  await channel.assertQueue(`${queue}.dead`, { durable: true, arguments: { 'x-queue-type': 'quorum' } });
  await channel.assertQueue(queue, { durable: true, arguments: requestQueueArguments(queue) });
  await serve(channel, queue, methods, options);
  return queue;
}

/** Runs the `warren` CLI (without blocking the event loop, which serves the Node responder). */
function warren(...args) {
  return new Promise((resolve, reject) => {
    const child = spawn(binary('warren'), args, {
      env: { ...process.env, WARREN_BROKER_URI: BROKER_URI },
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 45_000,
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => { stdout += chunk; });
    child.stderr.on('data', (chunk) => { stderr += chunk; });
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

// --- (a, b) a Node caller written from docs/protocol.md calls a warren worker ------------------------------------

test('a Node caller calls a warren worker: add [1, 2] is 3', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const defer = cleanups(t);
  const connection = await connect(defer);
  const queue = await startWorker(defer, connection);
  const caller = await WarrenCaller.open(connection);

  const reply = await caller.callRaw(queue, 'add', '[1, 2]');
  assert.equal(reply.properties.headers['x-status'], 'ok');
  assert.equal(reply.properties.contentType, 'application/json');
  assert.equal(decodeReply(reply), 3);

  assert.equal(await caller.call(queue, 'add', { a: 40, b: 2 }), 42);
  const nested = { nested: [1, 'two', null] };
  assert.deepEqual(await caller.call(queue, 'echo', nested), nested);
});

test('an unknown method gets an error reply with code unknown_method', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const defer = cleanups(t);
  const connection = await connect(defer);
  const queue = await startWorker(defer, connection);
  const caller = await WarrenCaller.open(connection);

  const reply = await caller.callRaw(queue, 'no_such_method', '[1, 2]');
  assert.equal(reply.properties.headers['x-status'], 'error');
  assert.equal(reply.properties.contentType, 'application/json');
  const error = JSON.parse(reply.content.toString('utf8'));
  assert.equal(error.code, 'unknown_method');
  assert.equal(typeof error.message, 'string');

  await assert.rejects(caller.call(queue, 'no_such_method', [1, 2]), (e) => {
    assert.ok(e instanceof RemoteError, String(e));
    assert.equal(e.code, 'unknown_method');
    assert.ok(e.remoteMessage);
    return true;
  });
});

test('a malformed body or params that do not fit get bad_request', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const defer = cleanups(t);
  const connection = await connect(defer);
  const queue = await startWorker(defer, connection);
  const caller = await WarrenCaller.open(connection);

  for (const body of ['{oops', '["one", 2]']) {
    const reply = await caller.callRaw(queue, 'add', body);
    assert.equal(reply.properties.headers['x-status'], 'error', body);
    const error = JSON.parse(reply.content.toString('utf8'));
    assert.equal(error.code, 'bad_request', body);
    assert.equal(typeof error.message, 'string', body);
  }
});

test('a request past its x-deadline is not run: deadline_exceeded', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const defer = cleanups(t);
  const connection = await connect(defer);
  const queue = await startWorker(defer, connection);
  const caller = await WarrenCaller.open(connection);

  // The request itself is fresh (expiration 10 s) but says its caller gave up a minute ago.
  const past = Date.now() - 60_000;
  await assert.rejects(caller.call(queue, 'add', [1, 2], { headers: { 'x-deadline': past } }), (e) => {
    assert.ok(e instanceof RemoteError, String(e));
    assert.equal(e.code, 'deadline_exceeded');
    return true;
  });
});

test('a call to a missing queue fails at once: basic.return 312 NO_ROUTE', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const defer = cleanups(t);
  const connection = await connect(defer);
  const caller = await WarrenCaller.open(connection);
  const queue = uniqueQueue('missing');
  const started = Date.now();
  await assert.rejects(caller.call(queue, 'add', [1, 2], { timeoutMs: 30_000 }), (e) => {
    assert.ok(e instanceof NoSuchService, String(e));
    assert.equal(e.replyCode, 312);
    assert.equal(e.queue, queue);
    return true;
  });
  assert.ok(Date.now() - started < 10_000, 'the broker returned the request, the call did not wait for its timeout');
});

// --- (c) a Node responder written from docs/protocol.md answers `warren call` ----------------------------------

function positional(params, names) {
  if (Array.isArray(params) && params.length === names.length) return params;
  if (params && typeof params === 'object' && !Array.isArray(params)) {
    const keys = Object.keys(params);
    if (keys.length === names.length && names.every((name) => keys.includes(name))) {
      return names.map((name) => params[name]);
    }
  }
  throw new BadParams(`expected params (${names.join(', ')}), got ${JSON.stringify(params)}`);
}

function numbers(params, names) {
  const values = positional(params, names);
  if (!values.every((value) => typeof value === 'number')) throw new BadParams('expected numbers');
  return values;
}

const CALCULATOR = {
  add: (params) => {
    const [a, b] = numbers(params, ['a', 'b']);
    return a + b;
  },
  divide: (params) => {
    const [a, b] = numbers(params, ['a', 'b']);
    if (b === 0) throw new HandlerError('division by zero', { a, b });
    return a / b;
  },
  echo: (params) => params,
};

test('warren call is answered by a Node responder: add [1,2] prints 3', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const defer = cleanups(t);
  const connection = await connect(defer);
  const queue = await startNodeResponder(defer, connection, CALCULATOR);

  let done = await warren('call', queue, 'add', '[1,2]', '--timeout', '20s');
  assert.deepEqual([done.code, done.stdout.trim()], [0, '3'], done.stderr);
  done = await warren('call', queue, 'add', '{"a": 1, "b": 2}', '--timeout', '20s');
  assert.deepEqual([done.code, done.stdout.trim()], [0, '3'], done.stderr);
  done = await warren('call', queue, 'echo', '["x", {"y": null}]', '--timeout', '20s');
  assert.equal(done.code, 0, done.stderr);
  assert.deepEqual(JSON.parse(done.stdout), ['x', { y: null }]);
});

test('warren call exits 1 with the code on stderr when the Node responder replies an error', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const defer = cleanups(t);
  const connection = await connect(defer);
  const queue = await startNodeResponder(defer, connection, CALCULATOR);

  let done = await warren('call', queue, 'divide', '[1, 0]', '--timeout', '20s');
  assert.equal(done.code, 1, done.stderr);
  assert.match(done.stderr, /handler_error/);
  assert.match(done.stderr, /division by zero/);
  assert.equal(done.stdout, '');
  done = await warren('call', queue, 'multiply', '[2, 3]', '--timeout', '20s');
  assert.equal(done.code, 1, done.stderr);
  assert.match(done.stderr, /unknown_method/);
  done = await warren('call', queue, 'add', '[1]', '--timeout', '20s');
  assert.equal(done.code, 1, done.stderr);
  assert.match(done.stderr, /bad_request/);
});
