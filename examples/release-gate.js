export const meta = {
  name: 'release-gate',
  description: 'Run the saved code-audit workflow on the files of a release and turn its report into a pass/fail gate with a PR comment.',
  whenToUse: 'In CI before tagging a release: block on critical/high findings and post a readable summary.',
  phases: [
    { title: 'Audit', detail: 'The saved code-audit workflow runs inline (its agents appear under its own group)' },
    { title: 'Gate', detail: 'Decide pass/fail from the severity counts and draft a PR comment' },
  ],
};

// Pattern: composition. workflow(name, args) runs a *saved* workflow inline,
// sharing this run's concurrency, agent cap and budget, and returns its result.
// REQUIRES code-audit to be saved first:
//   quickflow workflows save examples/code-audit.js
// Nesting is one level only: the child (code-audit) must not call workflow().
// args: { files?: string[], blockOn?: string[], release?: string }

const files = Array.isArray(args?.files) && args.files.length > 0
  ? args.files.map(String)
  : ['src/server.js', 'src/auth.js', 'src/db.js', 'src/routes/orders.js'];
const blockOn = Array.isArray(args?.blockOn) ? args.blockOn.map(String) : ['critical', 'high'];
const release = typeof args?.release === 'string' ? args.release : 'next';

const isRunLimit = (e) =>
  (typeof WorkflowBudgetExceededError === 'function' && e instanceof WorkflowBudgetExceededError) ||
  (typeof WorkflowAgentCapError === 'function' && e instanceof WorkflowAgentCapError);

function countOf(report, severity) {
  const n = report?.counts?.[severity];
  if (typeof n === 'number') return n;
  const list = report?.bySeverity?.[severity];
  return Array.isArray(list) ? list.length : 0;
}

function blockers(report) {
  const out = [];
  for (const s of blockOn) {
    for (const f of report?.bySeverity?.[s] ?? []) out.push(`[${s}] ${f.file}:${f.line} ${f.title}`);
  }
  return out;
}

phase('Audit');
log(`Release ${release}: auditing ${files.length} file(s) via the saved code-audit workflow`);
let report;
try {
  report = await workflow('code-audit', { files, focus: 'security and data integrity' });
} catch (e) {
  // Run limits (budget, agent cap) are not a setup problem: let them through as they are.
  if (isRunLimit(e)) throw e;
  // Most likely: code-audit is not saved on this server (the message lists the saved names).
  throw new Error(`code-audit failed or is not saved (quickflow workflows save examples/code-audit.js): ` +
    `${e?.message ?? e}`);
}
// Never pass a gate on a report we do not understand (e.g. an older code-audit).
const isObj = (x) => x !== null && typeof x === 'object';
if (!isObj(report) || (!isObj(report.counts) && !isObj(report.bySeverity))) {
  throw new Error('code-audit returned no usable report (expected counts/bySeverity); refusing to pass the gate blind');
}

phase('Gate');
const unaudited = Array.isArray(report.failed) ? report.failed : [];
const blocking = blockers(report);
const counts = Object.fromEntries(['critical', 'high', 'medium', 'low', 'info'].map((s) => [s, countOf(report, s)]));
// Files the audit could not cover also block: an unaudited file is not a clean file.
const passed = blocking.length === 0 && unaudited.length === 0;
log(`Gate ${passed ? 'PASSED' : 'FAILED'}: ${blocking.length} blocking finding(s), ${unaudited.length} unaudited file(s)`);

// The gate decision is already made; the comment is a courtesy and must not
// turn a finished audit into a failed run (e.g. when the budget ran out).
let comment = null;
try {
  comment = await agent(
    `Write a short GitHub PR comment (markdown, under 150 words) for release ${release}. ` +
    `Gate: ${passed ? 'passed' : 'failed'}. Counts: ${JSON.stringify(counts)}.\n` +
    `Audit summary: ${report.summary ?? '(none)'}\n` +
    `Blocking findings:\n${blocking.slice(0, 20).join('\n') || '(none)'}\n` +
    `Unaudited files: ${unaudited.join(', ') || '(none)'}`,
    { label: 'PR comment', model: 'haiku' },
  );
} catch (e) {
  console.warn(`PR comment skipped: ${e?.message ?? e}`);
}

return {
  release,
  passed,
  counts,
  blocking,
  unaudited,
  topRisks: Array.isArray(report.topRisks) ? report.topRisks : [],
  comment,
};
