export const meta = {
  name: 'code-audit',
  description: 'Audit source files in parallel and synthesize the findings, grouped by severity.',
  whenToUse: 'A per-file review of a handful to a few hundred files for bugs, security holes and error-handling gaps, merged into one prioritized report.',
  phases: [
    { title: 'Audit', detail: 'One agent per file returns structured findings' },
    { title: 'Synthesize', detail: 'One agent ranks the merged findings and writes the summary' },
  ],
};

// Pattern: fan-out-and-synthesize. Each file gets a fresh agent with a clean
// context (parallel = barrier), then a single agent sees only the merged,
// structured findings - never the raw file contents.
// args: { files?: string[], focus?: string }

const SEVERITIES = ['critical', 'high', 'medium', 'low', 'info'];
const files = Array.isArray(args?.files) && args.files.length > 0
  ? args.files.map(String)
  : ['src/server.js', 'src/auth.js', 'src/db.js'];
const focus = typeof args?.focus === 'string' ? args.focus : 'correctness, security and error handling';

const FINDINGS_SCHEMA = {
  type: 'object',
  required: ['findings'],
  properties: {
    findings: {
      type: 'array',
      items: {
        type: 'object',
        required: ['title', 'severity', 'line', 'explanation'],
        properties: {
          title: { type: 'string', description: 'One-line name of the problem' },
          severity: { type: 'string', enum: SEVERITIES },
          line: { type: 'integer', minimum: 0, description: '0 when not tied to a line' },
          explanation: { type: 'string' },
          suggestion: { type: 'string' },
        },
      },
    },
  },
};

const SUMMARY_SCHEMA = {
  type: 'object',
  required: ['summary', 'topRisks'],
  properties: {
    summary: { type: 'string' },
    topRisks: { type: 'array', items: { type: 'string' }, maxItems: 5 },
  },
};

function auditFile(file) {
  return agent(
    `Audit the file ${file} in this repository. Focus on ${focus}. ` +
    'Report only real, specific problems; an empty list is a fine answer. ' +
    'Use severity "critical" only for exploitable or data-losing defects.',
    { label: `audit ${file}`, schema: FINDINGS_SCHEMA },
  );
}

function groupBySeverity(findings) {
  const groups = {};
  for (const s of SEVERITIES) groups[s] = [];
  for (const f of findings) (groups[f.severity] ?? groups.info).push(f);
  for (const s of SEVERITIES) groups[s].sort((a, b) => a.file.localeCompare(b.file) || a.line - b.line);
  return groups;
}

phase('Audit');
log(`Auditing ${files.length} file(s) for ${focus}`);
const results = await parallel(files.map((file) => () => auditFile(file)));

const findings = [];
const failed = [];
results.forEach((res, i) => {
  // null = the agent failed, timed out or was stopped; keep going with the rest.
  if (!res || !Array.isArray(res.findings)) { failed.push(files[i]); return; }
  for (const f of res.findings) findings.push({ ...f, file: files[i] });
});
if (failed.length) log(`No result for ${failed.length} file(s): ${failed.join(', ')}`);

const bySeverity = groupBySeverity(findings);
const counts = Object.fromEntries(SEVERITIES.map((s) => [s, bySeverity[s].length]));
log(`Found ${findings.length} finding(s): ` + SEVERITIES.map((s) => `${s}=${counts[s]}`).join(' '));

phase('Synthesize');
let synthesis = null;
if (findings.length > 0) {
  const digest = findings
    .slice(0, 200)
    .map((f) => `- [${f.severity}] ${f.file}:${f.line} ${f.title}`)
    .join('\n');
  try {
    synthesis = await agent(
      `You are given the merged findings of a code audit (${focus}).\n${digest}\n\n` +
      'Write a short executive summary and list up to five top risks, most urgent first.',
      { label: 'synthesize audit', schema: SUMMARY_SCHEMA },
    );
  } catch (e) {
    // The findings are the product; the summary is a bonus. Keep them even if
    // synthesis fails (bad structured output, budget exhausted at the end).
    console.warn(`synthesis failed: ${e?.message ?? e}`);
  }
}

return {
  files,
  audited: files.filter((f) => !failed.includes(f)),
  failed,
  total: findings.length,
  counts,
  bySeverity,
  summary: synthesis?.summary ?? (findings.length ? 'Synthesis unavailable.' : 'No findings.'),
  topRisks: synthesis?.topRisks ?? [],
};
