export const meta = {
  name: 'tournament',
  description: 'Generate competing solutions with different approaches, then pick a winner through a single-elimination bracket of pairwise judges.',
  whenToUse: 'Choosing the best of several designs or implementations, where "A beats B" is easier to judge reliably than a 1-10 score.',
  phases: [
    { title: 'Generate', detail: 'One agent per approach writes a candidate' },
    { title: 'Bracket', detail: 'Pairwise judge agents, one round at a time, until one candidate is left' },
  ],
};

// Pattern: tournament. Pairwise comparison instead of absolute scoring. The
// bracket lives in script variables; each match is an independent judge with
// a clean context. Odd fields give the top seed a bye. The presentation order
// alternates per match to dampen the judge's position bias.
// args: { task?: string, approaches?: string[] }

const task = typeof args?.task === 'string' ? args.task
  : 'Design a cache for per-user permission lookups in a multi-tenant API (invalidation included).';
const approaches = Array.isArray(args?.approaches) && args.approaches.length >= 2
  ? [...new Set(args.approaches.map(String))].slice(0, 16)
  : ['in-process LRU with TTL', 'Redis with pub/sub invalidation', 'versioned keys (no explicit invalidation)',
    'write-through cache in the database layer', 'HTTP caching with ETags'];

const JUDGE_SCHEMA = {
  type: 'object',
  required: ['winner', 'reason'],
  properties: { winner: { type: 'string', enum: ['A', 'B'] }, reason: { type: 'string' } },
};

async function judge(x, y, round, match) {
  const swap = (round + match) % 2 === 1;
  const [a, b] = swap ? [y, x] : [x, y];
  const verdict = await agent(
    `Task: ${task}\n\nCompare the two proposals. Judge correctness first, then simplicity, then cost.\n\n` +
    `=== Proposal A ===\n${a.text}\n\n=== Proposal B ===\n${b.text}\n\nWhich is better overall?`,
    { label: `r${round} m${match + 1}: ${a.approach} vs ${b.approach}`, phase: 'Bracket', schema: JUDGE_SCHEMA },
  );
  // A failed judge must not stall the bracket: the higher seed (x) advances.
  const winner = !verdict ? x : verdict.winner === 'A' ? a : b;
  return { round, a: a.approach, b: b.approach, winner: winner.approach, reason: verdict?.reason ?? 'judge failed; higher seed advances' };
}

phase('Generate');
log(`${approaches.length} approaches compete on: ${task}`);
const drafts = await parallel(approaches.map((approach) => () => agent(
  `Task: ${task}\nSolve it using this approach: ${approach}. Be concrete; under 300 words.`,
  { label: `candidate: ${approach}` },
)));
let field = approaches
  .map((approach, i) => ({ approach, text: drafts[i] }))
  .filter((c) => typeof c.text === 'string' && c.text.trim() !== '');
log(`${field.length} candidate(s) produced`);

phase('Bracket');
const matches = [];
let round = 0;
let unfinished = false;
while (field.length > 1) {
  round += 1;
  const pairs = [];
  const next = field.length % 2 === 1 ? [field[0]] : []; // bye for the top seed
  for (let i = next.length; i + 1 < field.length; i += 2) pairs.push([field[i], field[i + 1]]);
  let results;
  try {
    results = await parallel(pairs.map(([x, y], m) => () => judge(x, y, round, m)));
  } catch (e) {
    // Budget spent before this round could start: report the remaining field.
    if (typeof WorkflowBudgetExceededError !== 'function' || !(e instanceof WorkflowBudgetExceededError)) throw e;
    log(`Budget exhausted before round ${round}; ${field.length} finalists remain`);
    unfinished = true;
    break;
  }
  results.forEach((r, m) => {
    const winner = r ? pairs[m].find((c) => c.approach === r.winner) : pairs[m][0];
    if (r) matches.push(r);
    next.push(winner ?? pairs[m][0]);
  });
  log(`Round ${round}: ${next.map((c) => c.approach).join(' | ')}`);
  field = next;
}

const champion = unfinished ? null : field[0] ?? null;
return {
  task,
  champion: champion ? champion.approach : null,
  solution: champion ? champion.text : null,
  finalists: field.map((c) => c.approach),
  rounds: unfinished ? round - 1 : round,
  matches,
};
