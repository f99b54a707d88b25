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

  // --- built-ins the slice limit cannot stop -----------------------------------------------
  // The engine polls its time limit between bytecodes, once every few thousand calls or loop
  // turns, and never inside a built-in call. So one call can run for hours (join() or sort()
  // of an array-like whose length says four billion, a quadratic string search), and a loop of
  // slow calls runs thousands of them before the next poll. The built-ins that can do either
  // are wrapped, and give the built-ins' own results:
  // - long calls read the slice's wall clock (qf$cover), and once the slice has run twice its
  //   limit they spin, so that the engine's next poll stops the script (__quickflow_slice_clock);
  // - an array method refuses a length above MAX_ARRAY_WORK: no array that fits the heap
  //   gets near it, only sparse arrays and array-likes;
  // - a string search whose worst case is above SEARCH_WORK comparisons runs in windows, and
  //   reads the clock between them.
  // What still overruns is abandoned by the pool (sandbox/_pool.py).
  const realNow = RealDate.now;
  let sliceEnds = Infinity;
  const qf$checkClock = function qf$checkClock() {
    if (realNow() > sliceEnds) for (;;) {}
  };
  // Reading the clock costs about as much as a short call: long calls read it once they have
  // covered CLOCK_BUDGET elements or characters between them.
  let covered = 0;
  const qf$cover = function qf$cover(n) {
    covered += n;
    if (covered > CLOCK_BUDGET) {
      covered = 0;
      qf$checkClock();
    }
  };
  const apply = Reflect.apply;
  const mathMin = Math.min, mathMax = Math.max, mathTrunc = Math.trunc;
  // ToString: throws for symbols, as the built-ins do; a template literal copies its string.
  const toStr = function qf$toString(v) { return typeof v === 'string' ? v : `${v}`; };
  const isObject = (v) => v !== null && (typeof v === 'object' || typeof v === 'function');
  const regExpSource = getOwnPropertyDescriptor(RegExp.prototype, 'source').get; // throws unless a RegExp
  const MAX_ARRAY_WORK = 2 ** 25;
  const SEARCH_SHORT = 32; // patterns this long or shorter: the native search, at most 32 × n comparisons
  const SEARCH_WORK = 2 ** 22;
  const SEARCH_HEAD = 256;
  const CLOCK_FROM = 4096; // calls on shorter strings and arrays are cheap: the engine's own polls stop their loops
  const CLOCK_BUDGET = 2 ** 24;

  // A wrapper is a method (no prototype, not a constructor) named qf$<name>, so that failure
  // positions skip its frames as they skip the prelude's.
  const wrap = (proto, name, body) => {
    const native = proto[name];
    const wrapper = body(native);
    defineProperty(wrapper, 'length', { value: native.length });
    defineProperty(proto, name, { value: wrapper, writable: true, enumerable: false, configurable: true });
  };

  // The elements an array method walks: the length of its receiver (for concat, of everything
  // it spreads), read once more than the method itself reads it.
  const qf$spread = function qf$spread(item) {
    if (!isObject(item)) return 0;
    const spreadable = item[Symbol.isConcatSpreadable];
    return (spreadable !== undefined ? spreadable : Array.isArray(item)) ? +item.length : 0;
  };
  const qf$arrayWork = function qf$arrayWork(name, receiver, args) {
    let work;
    if (name === 'concat') {
      work = qf$spread(receiver);
      for (let i = 0; i < args.length; i++) work += qf$spread(args[i]);
    } else {
      work = isObject(receiver) ? +receiver.length : 0;
    }
    if (work > MAX_ARRAY_WORK) {
      throw new RangeError(`Array.prototype.${name}() over ${work} elements: at most ${MAX_ARRAY_WORK} in one call ` +
        'in a workflow script (a sparse array or an array-like?)');
    }
    if (work > CLOCK_FROM) qf$cover(work);
  };
  for (const name of ['join', 'toLocaleString', 'reverse', 'sort', 'shift', 'unshift', 'slice', 'splice',
    'copyWithin', 'flat', 'flatMap', 'concat']) {
    wrap(Array.prototype, name, (native) => ({
      [`qf$${name}`]() {
        // sort checks its comparator before it reads anything
        if (name !== 'sort' || arguments[0] === undefined || typeof arguments[0] === 'function') {
          qf$arrayWork(name, this, arguments);
        }
        return apply(native, this, arguments);
      },
    })[`qf$${name}`]);
  }

  const SP = String.prototype;
  // A search: the common case, a string searched for a short string, goes straight to the
  // built-in; the rest to `general`, which converts the arguments and bounds the work.
  const wrapSearch = (name, general) => wrap(SP, name, (native) => {
    const callNative = Function.prototype.call.bind(native);
    const slow = general(native);
    return ({
      [`qf$${name}`](pattern, extra) {
        if (typeof this === 'string' && typeof pattern === 'string' && pattern.length <= SEARCH_SHORT) {
          if (this.length > CLOCK_FROM) qf$cover(this.length);
          return callNative(this, pattern, extra);
        }
        return apply(slow, this, [pattern, extra]);
      },
    })[`qf$${name}`];
  });
  const nIndexOf = SP.indexOf, nLastIndexOf = SP.lastIndexOf, nSlice = SP.slice, nStartsWith = SP.startsWith;
  const heavy = (n, m) => m > SEARCH_SHORT && (n - m + 1) * m > SEARCH_WORK;
  const toInteger = function qf$toInteger(v) { const x = +v; return x !== x ? 0 : mathTrunc(x); }; // ToIntegerOrInfinity

  // The first index ≥ from where P occurs in S, or -1. The first SEARCH_HEAD characters of P
  // are searched natively, a window of start positions at a time; the rest is compared by
  // startsWith at each candidate.
  function qf$find(S, P, from) {
    const n = S.length, m = P.length;
    const k = m < SEARCH_HEAD ? m : SEARCH_HEAD;
    const head = k === m ? P : apply(nSlice, P, [0, k]);
    const width = mathMax(1, mathTrunc(SEARCH_WORK / k));
    for (let lo = from; lo <= n - m; lo += width) {
      qf$checkClock();
      const window = apply(nSlice, S, [lo, mathMin(n - m, lo + width - 1) + k]);
      for (let at = apply(nIndexOf, window, [head]); at >= 0; at = apply(nIndexOf, window, [head, at + 1])) {
        qf$checkClock();
        if (k === m || apply(nStartsWith, S, [P, lo + at])) return lo + at;
      }
    }
    return -1;
  }

  // The last index ≤ from where P occurs in S, or -1; windows from the end.
  function qf$findLast(S, P, from) {
    const n = S.length, m = P.length;
    const k = m < SEARCH_HEAD ? m : SEARCH_HEAD;
    const head = k === m ? P : apply(nSlice, P, [0, k]);
    const width = mathMax(1, mathTrunc(SEARCH_WORK / k));
    for (let hi = mathMin(from, n - m); hi >= 0; hi -= width) {
      qf$checkClock();
      const lo = mathMax(0, hi - width + 1);
      const window = apply(nSlice, S, [lo, hi + k]);
      for (let at = apply(nLastIndexOf, window, [head]); at >= 0; at = at > 0 ? apply(nLastIndexOf, window, [head, at - 1]) : -1) {
        qf$checkClock();
        if (k === m || apply(nStartsWith, S, [P, lo + at])) return lo + at;
      }
    }
    return -1;
  }

  // GetSubstitution for a string pattern: no captures, so only $$, $&, $` and $' are special.
  function qf$substitute(matched, S, position, template) {
    if (apply(nIndexOf, template, ['$']) < 0) return template;
    let out = '';
    for (let i = 0; i < template.length; i++) {
      const c = template[i];
      const d = template[i + 1];
      if (c !== '$' || d === undefined) out += c;
      else if (d === '$') { out += '$'; i++; }
      else if (d === '&') { out += matched; i++; }
      else if (d === '`') { out += apply(nSlice, S, [0, position]); i++; }
      else if (d === "'") { out += apply(nSlice, S, [position + matched.length]); i++; }
      else out += c;
    }
    return out;
  }

  // A search value's own method for `key` (GetMethod), read once; undefined for primitives,
  // whose prototypes are frozen without one.
  function qf$method(value, key) {
    if (!isObject(value)) return undefined;
    const method = value[key];
    if (method === undefined || method === null) return undefined;
    if (typeof method !== 'function') throw new TypeError(`${String(key)} is not a function`);
    return method;
  }

  function qf$isRegExp(value) {
    if (!isObject(value)) return false;
    const matcher = value[Symbol.match];
    if (matcher !== undefined) return !!matcher;
    try {
      apply(regExpSource, value, []);
      return true;
    } catch (err) {
      return false;
    }
  }

  wrapSearch('indexOf', (native) => ({ qf$indexOf(searchString, position) {
    if (this === null || this === undefined) return apply(native, this, []);
    const S = toStr(this), P = toStr(searchString);
    if (S.length > CLOCK_FROM) qf$cover(S.length);
    if (!heavy(S.length, P.length)) return apply(native, S, [P, position]);
    return qf$find(S, P, mathMin(mathMax(toInteger(position), 0), S.length));
  } }).qf$indexOf);

  wrapSearch('includes', (native) => ({ qf$includes(searchString, position) {
    if (this === null || this === undefined) return apply(native, this, []);
    const S = toStr(this);
    if (S.length > CLOCK_FROM) qf$cover(S.length);
    if (qf$isRegExp(searchString)) throw new TypeError('First argument to String.prototype.includes must not be a regular expression');
    const P = toStr(searchString);
    if (!heavy(S.length, P.length)) return apply(native, S, [P, position]);
    return qf$find(S, P, mathMin(mathMax(toInteger(position), 0), S.length)) !== -1;
  } }).qf$includes);

  wrapSearch('lastIndexOf', (native) => ({ qf$lastIndexOf(searchString, position) {
    if (this === null || this === undefined) return apply(native, this, []);
    const S = toStr(this), P = toStr(searchString);
    if (S.length > CLOCK_FROM) qf$cover(S.length);
    if (!heavy(S.length, P.length)) return apply(native, S, [P, position]);
    const x = +position;
    const start = x !== x ? Infinity : mathTrunc(x);
    return qf$findLast(S, P, mathMin(mathMax(start, 0), S.length));
  } }).qf$lastIndexOf);

  wrapSearch('split', (native) => ({ qf$split(separator, limit) {
    if (this === null || this === undefined) return apply(native, this, []);
    const splitter = qf$method(separator, Symbol.split);
    if (splitter !== undefined) return apply(splitter, separator, [this, limit]);
    const S = toStr(this);
    if (S.length > CLOCK_FROM) qf$cover(S.length);
    const lim = limit === undefined ? 2 ** 32 - 1 : limit >>> 0;
    const R = toStr(separator);
    if (separator === undefined || lim === 0 || !heavy(S.length, R.length)) {
      return apply(native, S, [separator === undefined ? undefined : R, lim]);
    }
    const parts = [];
    let i = 0;
    for (let j = qf$find(S, R, 0); j !== -1; j = qf$find(S, R, i)) {
      parts.push(apply(nSlice, S, [i, j]));
      if (parts.length === lim) return parts;
      i = j + R.length;
    }
    parts.push(apply(nSlice, S, [i]));
    return parts;
  } }).qf$split);

  const qf$replaceAt = (S, P, positions, replaceValue) => {
    let out = '';
    let end = 0;
    for (const p of positions) {
      const replacement = typeof replaceValue === 'function'
        ? toStr(replaceValue(P, p, S)) : qf$substitute(P, S, p, replaceValue);
      out += apply(nSlice, S, [end, p]) + replacement;
      end = p + P.length;
    }
    return out + apply(nSlice, S, [end]);
  };

  // replace and replaceAll once the search value is a string: the built-in when the search is
  // cheap, else the first match or all of them, found in windows.
  function qf$replaceString(native, receiver, searchValue, replaceValue, all) {
    const S = toStr(receiver), P = toStr(searchValue);
    if (S.length > CLOCK_FROM) qf$cover(S.length);
    if (!heavy(S.length, P.length)) return apply(native, S, [P, replaceValue]);
    const template = typeof replaceValue === 'function' ? replaceValue : toStr(replaceValue);
    const positions = [];
    for (let p = qf$find(S, P, 0); p !== -1; p = all ? qf$find(S, P, p + P.length) : -1) positions.push(p);
    return qf$replaceAt(S, P, positions, template);
  }

  wrapSearch('replace', (native) => ({ qf$replace(searchValue, replaceValue) {
    if (this === null || this === undefined) return apply(native, this, []);
    const replacer = qf$method(searchValue, Symbol.replace);
    if (replacer !== undefined) return apply(replacer, searchValue, [this, replaceValue]);
    return qf$replaceString(native, this, searchValue, replaceValue, false);
  } }).qf$replace);

  wrapSearch('replaceAll', (native) => ({ qf$replaceAll(searchValue, replaceValue) {
    if (this === null || this === undefined) return apply(native, this, []);
    if (isObject(searchValue)) {
      if (qf$isRegExp(searchValue)) {
        const flags = searchValue.flags;
        if (flags === undefined || flags === null || apply(nIndexOf, toStr(flags), ['g']) < 0) {
          throw new TypeError('replaceAll must be called with a global RegExp');
        }
      }
      const replacer = qf$method(searchValue, Symbol.replace);
      if (replacer !== undefined) return apply(replacer, searchValue, [this, replaceValue]);
    }
    return qf$replaceString(native, this, searchValue, replaceValue, true);
  } }).qf$replaceAll);

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
  // For the prelude too: called as each slice starts, with the wall time after which the
  // wrapped built-ins stop the slice (0: never, while a slice is replayed).
  defineProperty(g, '__quickflow_slice_clock', {
    value: function qf$sliceClock(wallMs) {
      sliceEnds = wallMs > 0 ? realNow() + wallMs : Infinity;
    },
    configurable: true,
  });
})();
