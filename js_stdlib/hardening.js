// Hardening: runs first in every isolate, before the prelude and long before user code.
//
// 1. Remove what a workflow script must not have: eval, shared memory, weak references
//    (non-deterministic), queueMicrotask and performance (timing side channels).
// 2. Make every function constructor throw, so no string becomes code at run time.
// 3. Determinism shims: Date.now(), Date(), argument-less new Date() and Math.random() throw,
//    because resume replays the script and must take the same path.
// 4. Freeze every intrinsic reachable from the global constructors, so user code cannot
//    change the behaviour the prelude relies on. Properties that scripts commonly assign on
//    their own objects (name, message, toString, ...) become accessors whose setter defines
//    an own property, so freezing does not break `this.name = 'MyError'` in subclasses.
(function () {
  'use strict';
  const g = globalThis;
  const { defineProperty, getOwnPropertyDescriptor, getPrototypeOf, freeze, isFrozen } = Object;
  const ownKeys = Reflect.ownKeys;

  for (const name of [
    'eval', 'WebAssembly', 'SharedArrayBuffer', 'Atomics', 'WeakRef', 'FinalizationRegistry',
    'queueMicrotask', 'performance',
  ]) {
    delete g[name];
  }
  delete Error.prepareStackTrace; // an engine hook (accessor) that freezing cannot stop; its CallSites' getFunction() hand out prelude closures

  // --- function constructors -------------------------------------------------------------
  const noCode = function Function() {
    throw new EvalError('Function constructors are not available in workflow scripts: write the function directly');
  };
  const protos = [
    Function.prototype,
    getPrototypeOf(async function () {}),
    getPrototypeOf(function* () {}),
    getPrototypeOf(async function* () {}),
  ];
  noCode.prototype = Function.prototype;
  for (const proto of protos) {
    defineProperty(proto, 'constructor', { value: noCode, writable: false, configurable: false });
  }
  defineProperty(g, 'Function', { value: noCode, writable: false, configurable: false, enumerable: false });

  // --- Promise ----------------------------------------------------------------------------
  // The engine's Promise constructor runs the executor inside a native catch that turns any
  // exception into a rejection, the uncatchable "interrupted" of the slice limit included; a
  // loop creating promises whose executors spin would never end its slice. This constructor
  // calls the executor itself, where a JS catch cannot swallow the interrupt.
  const RealPromise = Promise;
  const withResolvers = RealPromise.withResolvers;
  const setPrototypeOf = Object.setPrototypeOf;
  const SafePromise = function Promise(executor) {
    if (new.target === undefined) throw new TypeError("Promise constructor cannot be invoked without 'new'");
    if (typeof executor !== 'function') throw new TypeError('Promise resolver is not a function');
    // withResolvers runs no JS inside the engine's catch (a capturing arrow would, and an
    // interrupt landing in it would be swallowed).
    const { promise, resolve, reject } = Reflect.apply(withResolvers, RealPromise, []);
    if (new.target !== SafePromise) setPrototypeOf(promise, new.target.prototype);
    try {
      executor(resolve, reject);
    } catch (err) {
      reject(err);
    }
    return promise;
  };
  defineProperty(SafePromise, 'prototype', { value: RealPromise.prototype, writable: false });
  // Fixed, not an overridable accessor like other prototypes' constructors: the engine reads it on
  // every await, and a getter would run JS there.
  defineProperty(RealPromise.prototype, 'constructor', { value: SafePromise, writable: false, configurable: false });
  Object.setPrototypeOf(SafePromise, getPrototypeOf(RealPromise));
  for (const key of ownKeys(RealPromise)) {
    if (key === 'prototype' || key === 'length' || key === 'name') continue;
    defineProperty(SafePromise, key, getOwnPropertyDescriptor(RealPromise, key));
  }
  // Promise.try calls its callback inside the same native catch: call it from JS instead.
  defineProperty(SafePromise, 'try', {
    value: function (fn, ...args) { return new this((resolve) => resolve(fn(...args))); },
    writable: true, configurable: true,
  });
  // No species: promises made by then() and await come from the engine's own constructor, whose
  // executor is native (no user code can run inside its catch), instead of a JS call to the one
  // above for every then(). Subclasses' then() therefore returns plain promises.
  defineProperty(SafePromise, Symbol.species, { value: undefined, writable: false, configurable: false });
  defineProperty(g, 'Promise', { value: SafePromise, writable: false, configurable: false, enumerable: false });

  // --- determinism -----------------------------------------------------------------------
  const RealDate = Date;
  const clockError = (what) => new Error(
    `${what} is not available in workflow scripts: a run must replay deterministically when it is resumed. ` +
    'Pass timestamps in args instead (e.g. args.now), or use new Date(timestamp).');
  const SafeDate = function Date(...parts) {
    if (new.target === undefined) throw clockError('Date()');
    if (parts.length === 0) throw clockError('new Date() without arguments');
    return Reflect.construct(RealDate, parts, new.target);
  };
  defineProperty(SafeDate, 'prototype', { value: RealDate.prototype, writable: false });
  defineProperty(RealDate.prototype, 'constructor', { value: SafeDate, writable: false, configurable: false });
  SafeDate.parse = RealDate.parse;
  SafeDate.UTC = RealDate.UTC;
  SafeDate.now = function now() { throw clockError('Date.now()'); };
  defineProperty(g, 'Date', { value: SafeDate, writable: false, configurable: false, enumerable: false });
  defineProperty(Math, 'random', {
    value: function random() {
      throw new Error(
        'Math.random() is not available in workflow scripts: a run must replay deterministically when it is ' +
        'resumed. Derive variation from data instead (put the index in the prompt, or pass a seed in args).');
    },
    writable: false, configurable: false,
  });

  // --- freeze intrinsics -----------------------------------------------------------------
  const overridable = new Set(['constructor', 'name', 'message', 'toString', 'toLocaleString', 'valueOf', 'toJSON', 'cause', 'stack']);
  const tameOverride = (obj, key) => {
    const desc = getOwnPropertyDescriptor(obj, key);
    if (!desc || !('value' in desc) || !desc.configurable) return;
    const value = desc.value;
    defineProperty(obj, key, {
      get() { return value; },
      set(newValue) {
        if (this === obj) throw new TypeError(`Cannot assign to read only property '${String(key)}' of a built-in`);
        defineProperty(this, key, { value: newValue, writable: true, enumerable: true, configurable: true });
      },
      enumerable: desc.enumerable,
      configurable: false,
    });
  };

  const roots = [];
  for (const key of ownKeys(g)) {
    const desc = getOwnPropertyDescriptor(g, key);
    if (desc && 'value' in desc && desc.value !== g && (typeof desc.value === 'function' || typeof desc.value === 'object') && desc.value !== null) {
      roots.push(desc.value);
      if (desc.configurable) defineProperty(g, key, { writable: false, configurable: false }); // the prelude looks these up at call time
    }
  }
  roots.push(...protos, getPrototypeOf([][Symbol.iterator]()), getPrototypeOf(getPrototypeOf([][Symbol.iterator]())),
    getPrototypeOf(new Map()[Symbol.iterator]()), getPrototypeOf(new Set()[Symbol.iterator]()),
    getPrototypeOf(''[Symbol.iterator]()), getPrototypeOf(/x/[Symbol.matchAll]('')),
    getPrototypeOf((function* () {})()), getPrototypeOf((async function* () {})()),
    getPrototypeOf(Int8Array));

  // One pass: tame, collect what is reachable, freeze. Descriptors are read all at once per
  // object (one native call, not one per key): this walk is most of an isolate's start-up.
  const getOwnPropertyDescriptors = Object.getOwnPropertyDescriptors;
  const seen = new Set();
  const stack = roots.slice();
  while (stack.length) {
    const obj = stack.pop();
    if (obj === null || (typeof obj !== 'object' && typeof obj !== 'function') || seen.has(obj) || obj === g) continue;
    seen.add(obj);
    if (typeof obj === 'object' && Object.hasOwn(obj, 'constructor')) {
      for (const key of overridable) tameOverride(obj, key);
    }
    const descs = getOwnPropertyDescriptors(obj);
    for (const key of ownKeys(descs)) {
      const desc = descs[key];
      const value = desc.value;
      if (value !== undefined) {
        if (value !== null && (typeof value === 'object' || typeof value === 'function')) stack.push(value);
      } else {
        if (desc.get !== undefined) stack.push(desc.get);
        if (desc.set !== undefined) stack.push(desc.set);
      }
    }
    stack.push(getPrototypeOf(obj));
  }
  for (const obj of seen) freeze(obj);

  // For the prelude, which takes it and deletes it before any user code runs: a promise with its
  // resolvers straight from the engine, for the prelude's own requests (no executor runs at all).
  // Defined after the walk, which would make it permanent.
  defineProperty(g, '__quickflow_resolvers', {
    value: Function.prototype.call.bind(withResolvers, RealPromise), configurable: true,
  });
})();
