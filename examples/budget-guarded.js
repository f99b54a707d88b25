export const meta = {
  name: 'budget-guarded',
  description: 'Draft a document, then critique-and-revise it in rounds while the token budget allows; always returns the best draft so far.',
  whenToUse: 'Iterative refinement under a hard token budget (run with budget_tokens), where a partial result beats a failed run.',
  phases: [
    { title: 'Draft', detail: 'One agent writes the first version' },
    { title: 'Refine', detail: 'Critique + revise rounds, each started only if the budget can likely afford it' },
  ],
};

// Pattern: budget-aware loop. Before each round, compare budget.remaining()
// with the most expensive round so far. budget.total is null when the run has
// no budget: remaining() is Infinity, so a round cap bounds the loop instead.
// If the budget still runs out mid-round, agent() throws
// WorkflowBudgetExceededError: catch it and return what we have.
// args: { topic?: string, maxRounds?: number, targetScore?: number }

const topic = typeof args?.topic === 'string' ? args.topic : 'a one-page design note on retrying idempotent HTTP requests';
const maxRounds = Number.isInteger(args?.maxRounds) && args.maxRounds > 0 ? args.maxRounds : 4;
const targetScore = typeof args?.targetScore === 'number' ? args.targetScore : 8;

const CRITIQUE_SCHEMA = {
  type: 'object',
  required: ['score', 'issues'],
  properties: {
    score: { type: 'integer', minimum: 1, maximum: 10 },
    issues: { type: 'array', items: { type: 'string' }, maxItems: 8 },
  },
};

const isBudgetError = (e) => typeof WorkflowBudgetExceededError === 'function' && e instanceof WorkflowBudgetExceededError;
const isBadOutput = (e) => typeof StructuredOutputError === 'function' && e instanceof StructuredOutputError;
const spent = () => budget.spent();

let best = { text: null, score: null, round: 0 };
let stoppedBecause = `max rounds (${maxRounds})`;
let costliestRound = 0;
const history = [];

try {
  phase('Draft');
  log(`Budget: ${budget.total === null ? 'unlimited' : budget.total + ' tokens'}; round cap ${maxRounds}`);
  const draft = await agent(`Write ${topic}. Plain markdown, no preamble.`, { label: 'first draft' });
  if (typeof draft === 'string' && draft.trim()) best = { text: draft, score: null, round: 0 };
  else stoppedBecause = 'the first draft failed';

  phase('Refine');
  for (let round = 1; best.text !== null && round <= maxRounds; round++) {
    const remaining = budget.remaining();
    if (remaining < costliestRound) {
      stoppedBecause = `budget: ${remaining} tokens left, a round has cost up to ${costliestRound}`;
      break;
    }
    const before = spent();
    const critique = await agent(
      `Critique this draft of ${topic}. Score it 1-10 and list concrete issues.\n\n${best.text}`,
      { label: `critique r${round}`, schema: CRITIQUE_SCHEMA, model: 'haiku' },
    );
    if (!critique) { stoppedBecause = `critique failed in round ${round}`; break; }
    best.score = critique.score;
    const goodEnough = critique.score >= targetScore || critique.issues.length === 0;
    const revised = goodEnough ? null : await agent(
      `Revise the draft to fix these issues:\n${critique.issues.map((x) => `- ${x}`).join('\n')}\n\n` +
      `Draft:\n${best.text}\n\nReturn only the full revised document.`,
      { label: `revise r${round}` },
    );
    const cost = spent() - before;
    costliestRound = Math.max(costliestRound, cost);
    history.push({ round, score: critique.score, issues: critique.issues.length, revised: !!revised, tokens: cost });
    log(`Round ${round}: score ${critique.score}, ${critique.issues.length} issue(s), ${cost} tokens`);
    if (goodEnough) { stoppedBecause = `good enough (score ${critique.score})`; break; }
    if (typeof revised === 'string' && revised.trim()) best = { text: revised, score: null, round };
  }
} catch (e) {
  if (isBudgetError(e)) {
    stoppedBecause = 'budget exceeded mid-round';
    log(`Budget exhausted (${e.message}); returning the best draft so far`);
  } else if (isBadOutput(e)) {
    stoppedBecause = 'critique gave no valid structured output';
    log(`Critique failed (${e.message}); returning the best draft so far`);
  } else {
    throw e; // a bug in this script: fail loudly
  }
}

return {
  topic,
  stoppedBecause,
  rounds: history.length,
  history,
  tokensSpent: spent(),
  budgetTotal: budget.total,
  draftRound: best.round,
  lastScore: best.score,
  text: best.text,
};
