export const meta = {
  name: 'generate-and-filter',
  description: 'Brainstorm many names for a product from several angles, deduplicate, screen each one, and keep a ranked shortlist.',
  whenToUse: 'Any "give me the best few of many options" task: names, test ideas, refactoring candidates.',
  phases: [
    { title: 'Generate', detail: 'Several brainstormers, each with its own angle' },
    { title: 'Filter', detail: 'Deduplicate, then one cheap screening agent per candidate' },
  ],
};

// Pattern: generate-and-filter. Generate generously (different angles for
// diversity), deduplicate deterministically in the script, then screen each
// survivor strictly with a small model and keep the top few.
// args: { product?: string, keep?: number, maxCandidates?: number }

const product = typeof args?.product === 'string' ? args.product : 'a CLI that runs JavaScript workflow scripts orchestrating LLM agents';
const keep = Number.isInteger(args?.keep) && args.keep > 0 ? args.keep : 5;
const maxCandidates = Number.isInteger(args?.maxCandidates) && args.maxCandidates > 0 ? Math.min(args.maxCandidates, 60) : 30;
const ANGLES = ['short and punchy', 'metaphors from music or conducting', 'plain descriptive', 'playful puns'];

const IDEAS_SCHEMA = {
  type: 'object',
  required: ['names'],
  properties: { names: { type: 'array', items: { type: 'string' }, maxItems: 12 } },
};
const SCREEN_SCHEMA = {
  type: 'object',
  required: ['ok', 'score', 'concern'],
  properties: {
    ok: { type: 'boolean', description: 'false if offensive, confusing, or an obvious trademark clash' },
    score: { type: 'integer', minimum: 1, maximum: 10 },
    concern: { type: 'string' },
  },
};

// "Quick Flow", "quickflow" and "quick-flow!" are the same candidate.
const normalize = (name) => String(name).toLowerCase().replace(/[^a-z0-9]/g, '');

phase('Generate');
const batches = await parallel(ANGLES.map((angle) => () => agent(
  `Brainstorm up to 12 names for ${product}. Style: ${angle}. Names only, no explanations.`,
  { label: `brainstorm: ${angle}`, schema: IDEAS_SCHEMA },
)));

const seen = new Set();
const candidates = [];
for (const batch of batches) {
  for (const raw of batch?.names ?? []) {
    const name = String(raw).trim();
    const key = normalize(name);
    if (!key || key.length > 24 || seen.has(key)) continue;
    seen.add(key);
    candidates.push(name);
  }
}
const pool = candidates.slice(0, maxCandidates);
log(`${candidates.length} unique candidate(s) from ${ANGLES.length} angles; screening ${pool.length}`);

phase('Filter');
let screens = [];
try {
  screens = await parallel(pool.map((name) => () => agent(
    `Screen the name "${name}" for ${product}. Is it memorable, easy to type, unambiguous, and free of ` +
    'obvious clashes with well-known tools? Score 1-10.',
    { label: `screen ${name}`, model: 'haiku', schema: SCREEN_SCHEMA },
  )));
} catch (e) {
  // parallel() throws at entry once the budget is spent: return the raw pool, unscreened.
  if (typeof WorkflowBudgetExceededError !== 'function' || !(e instanceof WorkflowBudgetExceededError)) throw e;
  log('Budget exhausted before screening; returning unscreened candidates');
  return { product, generated: candidates.length, screened: 0, shortlist: [], unscreened: pool };
}

const shortlist = pool
  .map((name, i) => ({ ...(screens[i] ?? { ok: false, score: 0, concern: 'screening failed' }), name }))
  .filter((c) => c.ok)
  .sort((a, b) => b.score - a.score || a.name.localeCompare(b.name))
  .slice(0, keep);
log(`Kept ${shortlist.length} of ${pool.length}`);

return { product, generated: candidates.length, screened: pool.length, shortlist };
