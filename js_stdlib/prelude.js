// The prelude: the globals of a workflow script (SPEC §2), evaluated after hardening.js.
//
// The bridge to the host is an outbox, not a function: every request is pushed as
// [kind, id, payload] onto an array that lives only in this closure, and promise resolvers
// wait in a map keyed by id. After each slice the host calls `take()` and receives the outbox
// as one JSON string; later it calls `settle(json)` with results. Only JSON crosses.
//
// The host handle (take/settle/start) is left on globalThis.__quickflow_host; the host takes
// the three functions and deletes the property before any user code runs.
//
// Every function whose frames may appear in an error's stack has a name starting with `qf$`
// or is a public global, so the host can skip them when it reports the user's line.
(function () {
  'use strict';
  const g = globalThis;
  const { defineProperty, freeze, keys: objectKeys } = Object;
  const isArray = Array.isArray;
  const stringify = JSON.stringify;
  const parse = JSON.parse;
  const qf$resolvers = g.__quickflow_resolvers; // see hardening.js
  delete g.__quickflow_resolvers;
  const qf$sliceClock = g.__quickflow_slice_clock; // see hardening.js
  delete g.__quickflow_slice_clock;

  // --- error classes -----------------------------------------------------------------------
  class WorkflowAgentCapError extends Error {
    constructor(message) { super(message); this.name = 'WorkflowAgentCapError'; }
  }
  class WorkflowBudgetExceededError extends Error {
    constructor(message) { super(message); this.name = 'WorkflowBudgetExceededError'; }
  }
  class StructuredOutputError extends Error {
    constructor(message, validationError) {
      super(message);
      this.name = 'StructuredOutputError';
      this.validationError = validationError;
    }
  }
  for (const cls of [WorkflowAgentCapError, WorkflowBudgetExceededError, StructuredOutputError]) {
    freeze(cls.prototype);
    freeze(cls);
  }
  const errorClasses = {
    TypeError, RangeError, Error, WorkflowAgentCapError, WorkflowBudgetExceededError, StructuredOutputError,
  };

  // --- state shared with the host ----------------------------------------------------------
  let outbox = [];
  const pending = Object.create(null); // id -> waiter; a plain object is several times cheaper than a Map here
  const timers = new Map(); // id -> [fn, args]
  let nextId = 1;
  let done = null; // set once the script's main promise settles
  let currentPhase = null;
  let currentPriority = null; // [stage, item, stages, items] while a pipeline stage runs synchronously
  let logLines = 0;
  const state = {
    maxAgents: 1000, maxItems: 4096, maxLogLines: 10000, depth: 0,
    issued: 0, spent: 0, total: null,
  };

  function qf$push(kind, id, payload) { outbox.push([kind, id, payload]); }

  // The newest request's promise and its waiter, for parallel(): a thunk that returns exactly
  // that promise gets its result through `listener(at, ok, value)`, called by settle() itself. A
  // then() would cost a job per result, and the host pays for every job (the engine runs one
  // per call). `at` (an index) lets one listener serve a whole parallel() or pipeline stage.
  let newestPromise = null;
  let newestWaiter = null;
  const qf$settled = (() => { const { promise, resolve } = qf$resolvers(); resolve(); return promise; })();

  function qf$request(kind, payload) {
    const id = nextId++;
    const { promise, resolve, reject } = qf$resolvers();
    const waiter = { resolve, reject, listener: null, at: 0, settled: false };
    pending[id] = waiter;
    qf$push(kind, id, payload);
    newestPromise = promise;
    newestWaiter = waiter;
    return promise;
  }

  // Registers `listener(at, ok, value)` for `promise` if it is the newest request, still
  // pending and not yet listened to; false otherwise (the caller uses then()). settle() calls a
  // batch's listeners in one job, after the reactions the script attached to those promises
  // itself.
  function qf$listen(promise, listener, at) {
    if (newestWaiter === null || promise !== newestPromise || newestWaiter.settled || newestWaiter.listener !== null) return false;
    newestWaiter.listener = listener;
    newestWaiter.at = at;
    return true;
  }

  function qf$message(err) {
    // Never throws, whatever a script throws (a getter on message, a toString that throws...).
    try {
      if (err instanceof Error) return String(err.message);
      return typeof err === 'string' ? err : stringify(err);
    } catch (_) {
      try { return String(err); } catch (_again) { return 'an unprintable value'; }
    }
  }

  function qf$errorInfo(err) {
    if (err instanceof Error) {
      const info = { name: String(err.name), message: String(err.message), stack: String(err.stack || '') };
      if (err.validationError !== undefined) info.validationError = String(err.validationError);
      return info;
    }
    return { name: 'Error', message: 'uncaught non-Error value: ' + qf$message(err), stack: '' };
  }

  function qf$makeError(info) {
    const cls = errorClasses[info && info.name] || Error;
    const err = cls === StructuredOutputError
      ? new StructuredOutputError(String(info.message), info.validationError)
      : new cls(String((info && info.message) || 'unknown error'));
    return err;
  }

  // --- agent() -----------------------------------------------------------------------------
  const EFFORTS = ['low', 'medium', 'high', 'xhigh', 'max'];
  const KNOWN_OPTIONS = freeze({
    __proto__: null, label: true, phase: true, schema: true, model: true, effort: true, agentType: true,
    isolation: true, timeout: true,
  });
  const NO_UNKNOWN = freeze([]);

  function qf$stringOption(key, v) {
    if (typeof v !== 'string' || v === '') throw new TypeError(`agent() option '${key}' must be a non-empty string`);
    return v;
  }

  // The unknown option names of the options qf$checkOptions checked last, set as it returns
  // (after every getter ran) and read by agent() right after: one object less per call than
  // returning both.
  let uncheckedKeys = NO_UNKNOWN;

  // Each option is read once (a getter runs once), in a fixed order. This runs once per agent()
  // call: indexed loops and no wrapper object, as the engine does not optimize those away.
  function qf$checkOptions(opts) {
    if (opts === undefined || opts === null) {
      uncheckedKeys = NO_UNKNOWN;
      return {};
    }
    if (typeof opts !== 'object' || isArray(opts)) {
      throw new TypeError('agent() options must be an object, e.g. agent(prompt, { label: "..." })');
    }
    const options = {};
    let unknown = NO_UNKNOWN;
    const names = objectKeys(opts);
    for (let k = 0; k < names.length; k++) {
      if (KNOWN_OPTIONS[names[k]] !== true) {
        if (unknown === NO_UNKNOWN) unknown = [];
        unknown.push(names[k]);
      }
    }
    const label = opts.label;
    if (label !== undefined && label !== null) options.label = qf$stringOption('label', label);
    const phase = opts.phase;
    if (phase !== undefined && phase !== null) options.phase = qf$stringOption('phase', phase);
    const model = opts.model;
    if (model !== undefined && model !== null) options.model = qf$stringOption('model', model);
    const agentType = opts.agentType;
    if (agentType !== undefined && agentType !== null) options.agentType = qf$stringOption('agentType', agentType);
    const effort = opts.effort;
    if (effort !== undefined && effort !== null) {
      if (!EFFORTS.includes(effort)) {
        throw new TypeError(`agent() option 'effort' must be one of ${EFFORTS.join(', ')}, not ${qf$message(effort)}`);
      }
      options.effort = effort;
    }
    const isolation = opts.isolation;
    if (isolation !== undefined && isolation !== null) {
      if (isolation !== 'worktree') throw new TypeError("agent() option 'isolation' must be 'worktree'");
      options.isolation = isolation;
    }
    const t = opts.timeout;
    if (t !== undefined && t !== null) {
      if (typeof t !== 'number' || !(t > 0) || t === Infinity) {
        throw new TypeError("agent() option 'timeout' must be a positive number of milliseconds");
      }
      options.timeout = t;
    }
    const s = opts.schema;
    if (s !== undefined && s !== null) {
      if (typeof s !== 'object' || isArray(s)) {
        throw new TypeError("agent() option 'schema' must be a JSON Schema object with type: 'object'");
      }
      let text;
      try { text = stringify(s); } catch (e) {
        throw new TypeError("agent() option 'schema' must be JSON-serializable: " + qf$message(e));
      }
      if (s.type !== 'object') {
        throw new TypeError("agent() option 'schema' must have type: 'object' at its root");
      }
      options.schema = parse(text);
    }
    uncheckedKeys = unknown;
    return options;
  }

  // Whether a string holds only whitespace; trim() copies the string, so only when it starts
  // with a character that may be whitespace (anything but printable ASCII).
  function qf$blank(text) {
    if (text === '') return true;
    const first = text.charCodeAt(0);
    return !(first > 32 && first < 127) && text.trim() === '';
  }

  function qf$exhausted() {
    if (state.issued >= state.maxAgents) {
      return new WorkflowAgentCapError(
        `agent cap reached: this run may start at most ${state.maxAgents} agents (raise options.max_agents)`);
    }
    if (state.total !== null && state.spent >= state.total) {
      return new WorkflowBudgetExceededError(
        `token budget exhausted: ${state.spent} of ${state.total} output tokens spent`);
    }
    return null;
  }

  function agent(prompt, opts) {
    let payload;
    try {
      if (typeof prompt !== 'string' || qf$blank(prompt)) {
        throw new TypeError('agent() expects a non-empty string prompt as its first argument');
      }
      payload = qf$checkOptions(opts);
      const stop = qf$exhausted();
      if (stop) throw stop;
    } catch (err) {
      return Promise.reject(err);
    }
    state.issued++;
    const unknown = uncheckedKeys;
    payload.prompt = prompt;
    if (payload.phase === undefined && currentPhase !== null) payload.phase = currentPhase;
    if (currentPriority !== null) payload.priority = currentPriority;
    if (unknown.length) payload.unknown = unknown;
    return qf$request('agent', payload);
  }

  // --- parallel() and pipeline() ----------------------------------------------------------
  function qf$failure(message) { qf$push('failure', 0, { message }); }

  function parallel(thunks) {
    if (!isArray(thunks) || thunks.some((t) => typeof t !== 'function')) {
      return Promise.reject(new TypeError(
        'parallel() expects an array of functions, not promises. Wrap each call: () => agent(...)'));
    }
    if (thunks.length > state.maxItems) {
      return Promise.reject(new RangeError(
        `parallel() accepts at most ${state.maxItems} functions, got ${thunks.length}: split the work into batches`));
    }
    if (thunks.length === 0) return Promise.resolve([]);
    const stop = qf$exhausted();
    if (stop) return Promise.reject(stop);
    // A counter, not Promise.all over async functions: one then() per thunk is about half the
    // engine work (and memory) of an async frame plus an await per thunk, for thousands of them.
    // One listener for every slot: closures per thunk only where a thunk returns something
    // else than its agent() promise.
    const count = thunks.length;
    const results = new Array(count);
    let remaining = count;
    let finish;
    const all = new Promise(function qf$executor(resolve) { finish = resolve; });
    const qf$slot = (i, ok, value) => {
      if (!ok) {
        qf$failure(`parallel[${i}] failed: ${qf$message(value)}`);
        value = null;
      }
      results[i] = value;
      if (--remaining === 0) finish(results);
    };
    for (let i = 0; i < count; i++) {
      try {
        const pending = thunks[i]();
        if (!qf$listen(pending, qf$slot, i)) {
          const qf$fulfilled = (value) => qf$slot(i, true, value);
          const qf$rejected = (err) => qf$slot(i, false, err);
          Promise.resolve(pending).then(qf$fulfilled, qf$rejected);
        }
      } catch (err) {
        qf$slot(i, false, err);
      }
    }
    return all;
  }

  function pipeline(items, ...stages) {
    if (!isArray(items)) {
      return Promise.reject(new TypeError('pipeline() expects an array of items as its first argument'));
    }
    if (items.length > state.maxItems) {
      return Promise.reject(new RangeError(
        `pipeline() accepts at most ${state.maxItems} items, got ${items.length}: split the work into batches`));
    }
    if (stages.some((s) => typeof s !== 'function')) {
      return Promise.reject(new TypeError(
        'pipeline() expects stage functions after the items: pipeline(items, (item) => agent(...), ...)'));
    }
    // Each item advances stage by stage through callbacks, not an async function: a stage's
    // agent() result then reaches the next stage without a promise job each (see qf$listen),
    // through one listener per stage for every item.
    const results = new Array(items.length);
    const kept = new Array(items.length); // each item as pipeline() read it
    let remaining = 1; // the launch below holds one count until every item has started
    let finish;
    const all = new Promise(function qf$executor(resolve) { finish = resolve; });
    const qf$done = (i, value) => {
      results[i] = value;
      if (--remaining === 0) finish(results);
    };
    const qf$failed = (i, err) => {
      qf$failure(`pipeline[${i}] failed: ${qf$message(err)}`);
      qf$done(i, null);
    };
    const qf$advance = (i, s, value) => {
      if (s === stages.length) return qf$done(i, value);
      // Agents started synchronously by this stage carry [stage, item, stages, items]: the
      // host lets the first items stream through and orders the rest (scheduling.queue_priority).
      const outer = currentPriority;
      currentPriority = [s, i, stages.length, kept.length];
      let pending;
      try {
        pending = stages[s](value, kept[i], i);
      } catch (err) {
        currentPriority = outer;
        return qf$failed(i, err);
      }
      currentPriority = outer;
      const next = stageDone[s];
      try {
        if (!qf$listen(pending, next, i)) {
          const qf$fulfilled = (result) => next(i, true, result);
          const qf$rejected = (err) => next(i, false, err);
          Promise.resolve(pending).then(qf$fulfilled, qf$rejected);
        }
      } catch (err) {
        qf$failed(i, err);
      }
    };
    // stageDone[s](i, ok, value): item i's stage s has its result.
    const stageDone = stages.map((_, s) => function qf$stageDone(i, ok, value) {
      if (!ok) return qf$failed(i, value);
      if (value === null) return qf$done(i, null);
      qf$advance(i, s + 1, value);
    });
    // map(), as before: the length is read once and holes are skipped (their results stay
    // undefined, which is null in JSON).
    items.map((item, i) => {
      remaining++;
      kept[i] = item;
      qf$advance(i, 0, item);
    });
    if (--remaining === 0) finish(results);
    return all;
  }

  // --- phase(), log(), console ------------------------------------------------------------
  function phase(title) {
    if (typeof title !== 'string' || title.trim() === '') throw new TypeError('phase() expects a non-empty string title');
    if (title.length > 200) title = title.slice(0, 200);
    if (currentPhase === title) return;
    currentPhase = title;
    qf$push('phase', 0, { title });
  }

  function qf$text(value) {
    if (typeof value === 'string') return value;
    try {
      const s = stringify(value);
      return s === undefined ? String(value) : s;
    } catch (_) {
      return String(value);
    }
  }

  const MAX_LINE = 65536;

  function qf$log(level, message) {
    if (message.length > MAX_LINE) {
      message = message.slice(0, MAX_LINE) + ` … [${message.length - MAX_LINE} more characters]`;
    }
    logLines++;
    if (logLines > state.maxLogLines) {
      if (logLines === state.maxLogLines + 1) {
        qf$push('log', 0, { level: 'warn', message: `log truncated: more than ${state.maxLogLines} lines` });
      }
      return;
    }
    qf$push('log', 0, { level, message });
  }

  function log(message) { qf$log('info', qf$text(message)); }

  const qf$join = (args) => args.map(qf$text).join(' ');
  const console = freeze({
    log: function log(...a) { qf$log('info', qf$join(a)); },
    info: function info(...a) { qf$log('info', qf$join(a)); },
    debug: function debug(...a) { qf$log('debug', qf$join(a)); },
    warn: function warn(...a) { qf$log('warn', '[warn] ' + qf$join(a)); },
    error: function error(...a) { qf$log('error', '[error] ' + qf$join(a)); },
  });

  // --- timers -------------------------------------------------------------------------------
  function setTimeout(fn, ms, ...args) {
    if (typeof fn !== 'function') throw new TypeError('setTimeout() expects a function as its first argument');
    // Like Node: a delay that is not a finite number from 1 to 2^31-1 ms becomes 1 ms.
    const delay = typeof ms === 'number' && ms >= 1 && ms <= 2147483647 ? ms : 1;
    const id = nextId++;
    timers.set(id, [fn, args]);
    qf$push('timer', id, { ms: delay });
    return id;
  }

  function clearTimeout(id) {
    if (timers.delete(id)) qf$push('clear_timer', id, null);
  }

  // --- workflow() ---------------------------------------------------------------------------
  function workflow(name, args) {
    if (typeof name !== 'string' || name === '') {
      return Promise.reject(new TypeError('workflow() expects the name of a saved workflow'));
    }
    if (state.depth >= 1) {
      return Promise.reject(new Error(
        `workflow('${name}') called inside a nested workflow: nesting is limited to one level`));
    }
    let payload;
    try {
      payload = args === undefined ? { name } : { name, args: parse(stringify(args)) };
    } catch (err) {
      return Promise.reject(new TypeError('workflow() args must be JSON-serializable: ' + qf$message(err)));
    }
    return qf$request('workflow', payload);
  }

  // --- the host handle --------------------------------------------------------------------
  // Serialize the script's return value; refuse what JSON would silently change.
  function qf$serialize(value) {
    const stack = [];
    const qf$check = (v, path) => {
      const t = typeof v;
      if (t === 'function') throw new TypeError(`the return value is not JSON-serializable: ${path} is a function`);
      if (t === 'bigint') throw new TypeError(`the return value is not JSON-serializable: ${path} is a BigInt`);
      if (t === 'symbol') throw new TypeError(`the return value is not JSON-serializable: ${path} is a Symbol`);
      if (t !== 'object' || v === null) return;
      if (stack.includes(v)) throw new TypeError(`the return value is not JSON-serializable: ${path} is a cycle`);
      stack.push(v);
      if (typeof v.toJSON !== 'function') {
        if (isArray(v)) v.forEach((x, i) => qf$check(x, `${path}[${i}]`));
        else for (const k of objectKeys(v)) qf$check(v[k], `${path}.${k}`);
      }
      stack.pop();
    };
    qf$check(value, 'result');
    const text = stringify(value === undefined ? null : value);
    return text === undefined ? 'null' : text;
  }

  function qf$finish(ok, value) {
    if (done !== null) return;
    if (!ok) { done = { ok: false, error: qf$errorInfo(value) }; return; }
    try {
      done = { ok: true, json: qf$serialize(value) };
    } catch (err) {
      done = { ok: false, error: qf$errorInfo(err) };
    }
  }

  function take() {
    const out = outbox;
    outbox = [];
    // The result travels as its own JSON text, so the host can bound its size before parsing.
    return stringify({ out, done });
  }

  function qf$syncState(s) {
    if (s === undefined || s === null) return;
    if (typeof s.spent === 'number') state.spent = s.spent;
    if (typeof s.issued === 'number') state.issued = s.issued;
  }

  function settle(json) {
    let listeners = null;
    const batch = parse(json);
    qf$sliceClock(batch.wallMs);
    qf$syncState(batch.state);
    for (const [id, ok, value] of batch.results || []) {
      const timer = timers.get(id);
      if (timer !== undefined) {
        timers.delete(id);
        if (done !== null) continue; // timers are no-ops after the run stops
        try {
          timer[0](...timer[1]);
        } catch (err) {
          qf$log('error', '[error] uncaught exception in a setTimeout callback: ' + qf$message(err));
        }
        continue;
      }
      const waiter = pending[id];
      if (waiter === undefined) continue;
      delete pending[id];
      waiter.settled = true;
      const outcome = ok ? value : qf$makeError(value);
      if (ok) waiter.resolve(outcome);
      else waiter.reject(outcome);
      if (waiter.listener !== null) {
        if (listeners === null) listeners = [];
        listeners.push(waiter.listener, waiter.at, ok, outcome);
      }
    }
    if (listeners !== null) {
      // One job for the batch, queued after the reactions the script attached to these
      // promises itself, so those run first, as they would with then().
      const batchListeners = listeners;
      qf$settled.then(function qf$listeners() {
        for (let k = 0; k < batchListeners.length; k += 4) {
          batchListeners[k](batchListeners[k + 1], batchListeners[k + 2], batchListeners[k + 3]);
        }
      });
    }
  }

  function start(main, configJson) {
    const config = parse(configJson);
    qf$sliceClock(config.wallMs);
    state.maxAgents = config.maxAgents;
    state.maxItems = config.maxItems;
    state.maxLogLines = config.maxLogLines;
    state.depth = config.depth;
    state.total = config.budgetTotal;
    qf$syncState(config.state);
    const total = state.total;
    const budget = freeze({
      total,
      spent: function spent() { return state.spent; },
      remaining: function remaining() { return total === null ? Infinity : Math.max(0, total - state.spent); },
    });
    const globals = {
      agent, parallel, pipeline, phase, log, workflow, budget, console, setTimeout, clearTimeout,
      WorkflowAgentCapError, WorkflowBudgetExceededError, StructuredOutputError,
      args: config.hasArgs ? config.args : undefined,
    };
    for (const name of objectKeys(globals)) {
      defineProperty(g, name, { value: globals[name], writable: false, enumerable: false, configurable: false });
    }
    let promise;
    try {
      promise = main();
    } catch (err) {
      qf$finish(false, err);
      return;
    }
    promise.then(function qf$resolved(v) { qf$finish(true, v); }, function qf$rejected(e) { qf$finish(false, e); });
  }

  g.__quickflow_host = { take, settle, start };
})();
