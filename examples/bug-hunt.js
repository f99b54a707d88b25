export const meta = {
  name: 'bug-hunt',
  description: 'Hunt for bugs in rounds of parallel hunters until two consecutive rounds find nothing new.',
  whenToUse: 'Open-ended bug or vulnerability mining where the amount of work is unknown up front.',
  phases: [
    { title: 'Hunt', detail: 'Rounds of parallel hunters, each with its own lens; findings deduplicated by key' },
    { title: 'Report', detail: 'Deduplicated findings, ordered by severity' },
  ],
};

// Pattern: loop-until-dry. No fixed iteration count: stop after DRY_LIMIT
// consecutive rounds without a new (deduplicated) finding, with a hard cap on
// rounds so the loop ends even if the models keep answering the same thing.
// args: { target?: string, maxRounds?: number, lenses?: string[] }

const target = typeof args?.target === 'string' ? args.target : 'the src/ directory';
const maxRounds = Number.isInteger(args?.maxRounds) && args.maxRounds > 0 ? Math.min(args.maxRounds, 20) : 5;
const lenses = Array.isArray(args?.lenses) && args.lenses.length > 0
  ? args.lenses.map(String)
  : ['error handling and exceptions', 'concurrency and race conditions', 'input validation', 'resource leaks'];
const DRY_LIMIT = 2;
const SEVERITY_ORDER = { high: 0, medium: 1, low: 2 };

const HUNT_SCHEMA = {
  type: 'object',
  required: ['bugs'],
  properties: {
    bugs: {
      type: 'array',
      items: {
        type: 'object',
        required: ['file', 'title', 'severity'],
        properties: {
          file: { type: 'string' },
          title: { type: 'string' },
          severity: { type: 'string', enum: ['high', 'medium', 'low'] },
          details: { type: 'string' },
        },
      },
    },
  },
};

// Two hunters describing the same bug in slightly different words should
// collapse to one key: lower-case, punctuation stripped, whitespace collapsed.
function keyOf(bug) {
  const norm = (s) => String(s ?? '').toLowerCase().replace(/[^a-z0-9]+/g, ' ').trim();
  return `${norm(bug.file)}::${norm(bug.title)}`;
}

function hunt(lens, round, known) {
  const skip = known.length
    ? `Already known (do not report again):\n${known.slice(-50).map((k) => `- ${k}`).join('\n')}\n`
    : '';
  return agent(
    `Round ${round}: hunt for real bugs in ${target}, looking through the lens of ${lens}.\n${skip}` +
    'Report only new, concrete bugs with file and a precise title. An empty list is fine.',
    { label: `r${round} ${lens}`, schema: HUNT_SCHEMA },
  );
}

phase('Hunt');
const found = new Map();
let dryRounds = 0;
let round = 0;
let stoppedBecause = `max rounds (${maxRounds})`;
while (round < maxRounds) {
  round += 1;
  const known = [...found.values()].map((b) => `${b.file}: ${b.title}`);
  let results;
  try {
    results = await parallel(lenses.map((lens) => () => hunt(lens, round, known)));
  } catch (e) {
    // parallel() throws at entry once the run's budget is spent: keep what we found.
    if (typeof WorkflowBudgetExceededError !== 'function' || !(e instanceof WorkflowBudgetExceededError)) throw e;
    stoppedBecause = 'token budget exhausted';
    round -= 1;
    break;
  }
  let fresh = 0;
  for (const res of results) {
    for (const bug of res?.bugs ?? []) {
      const key = keyOf(bug);
      if (key === '::' || found.has(key)) continue;
      found.set(key, { ...bug, round });
      fresh += 1;
    }
  }
  const failed = results.filter((r) => r === null).length;
  log(`Round ${round}: ${fresh} new, ${found.size} total` + (failed ? `, ${failed} hunter(s) failed` : ''));
  if (budget.remaining() <= 0) { stoppedBecause = 'token budget exhausted'; break; }
  // A round where every hunter failed proves nothing about dryness: stop instead.
  if (failed === results.length) { stoppedBecause = `every hunter failed in round ${round}`; break; }
  dryRounds = fresh === 0 ? dryRounds + 1 : 0;
  if (dryRounds >= DRY_LIMIT) { stoppedBecause = `${DRY_LIMIT} consecutive dry rounds`; break; }
}

phase('Report');
const bugs = [...found.values()].sort(
  (a, b) => (SEVERITY_ORDER[a.severity] ?? 3) - (SEVERITY_ORDER[b.severity] ?? 3) || a.round - b.round,
);
log(`Stopped after ${round} round(s): ${stoppedBecause}`);

return { target, rounds: round, stoppedBecause, total: bugs.length, bugs };
