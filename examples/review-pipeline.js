export const meta = {
  name: 'review-pipeline',
  description: 'Review changed files, then let three adversarial skeptics try to refute every finding; only majority-upheld findings survive.',
  whenToUse: 'Code review where false positives are expensive: each finding must survive independent attempts to disprove it.',
  phases: [
    { title: 'Review', detail: 'One reviewer per file (pipeline stage 1)' },
    { title: 'Verify', detail: 'Three skeptics per finding vote on whether it is real (pipeline stage 2)' },
  ],
};

// Pattern: adversarial verification inside a pipeline. A file's findings go to
// the skeptics as soon as that file's review is done (no barrier between
// stages); each finding gets three independent refutation attempts and
// survives on a 2-of-3 "not refuted" majority.
// args: { files?: string[], maxFindingsPerFile?: number }

const files = Array.isArray(args?.files) && args.files.length > 0
  ? args.files.map(String)
  : ['src/api/orders.js', 'src/api/payments.js', 'src/lib/cache.js'];
const maxFindings = Number.isInteger(args?.maxFindingsPerFile) && args.maxFindingsPerFile > 0 ? args.maxFindingsPerFile : 4;

const REVIEW_SCHEMA = {
  type: 'object',
  required: ['findings'],
  properties: {
    findings: {
      type: 'array',
      items: {
        type: 'object',
        required: ['title', 'severity', 'evidence'],
        properties: {
          title: { type: 'string' },
          severity: { type: 'string', enum: ['high', 'medium', 'low'] },
          evidence: { type: 'string', description: 'The code and reasoning that shows the problem' },
        },
      },
    },
  },
};
const VOTE_SCHEMA = {
  type: 'object',
  required: ['refuted', 'reason'],
  properties: { refuted: { type: 'boolean' }, reason: { type: 'string' } },
};

// Each skeptic attacks the finding from a different angle, so the votes are
// not three copies of the same argument.
const SKEPTICS = [
  'Show that the problematic code path is unreachable or its inputs are already validated upstream.',
  'Show that the behaviour is intended, documented, or harmless in practice.',
  'Construct a concrete counterexample or test showing the code is actually correct.',
];

function review(file) {
  return agent(
    `Review ${file} for bugs that would break production. Quote the code in "evidence". ` +
    'Return an empty list if the file is fine.',
    { label: `review ${file}`, phase: 'Review', schema: REVIEW_SCHEMA },
  );
}

async function vote(file, finding) {
  const votes = await parallel(SKEPTICS.map((angle, k) => () => agent(
    `You are skeptic #${k + 1}. Try hard to REFUTE this code review finding in ${file}.\n` +
    `Finding: ${finding.title} (${finding.severity})\nEvidence: ${finding.evidence}\n\n` +
    `Angle: ${angle}\nSet refuted=true only if you succeeded.`,
    { label: `skeptic ${k + 1}: ${file}`, phase: 'Verify', schema: VOTE_SCHEMA },
  )));
  const cast = votes.filter((v) => v && typeof v.refuted === 'boolean');
  const upheld = cast.filter((v) => !v.refuted).length;
  const refuted = cast.length - upheld;
  // Failed skeptics (null) abstain; a verdict needs 2 of 3 in one direction.
  const verdict = upheld >= 2 ? 'confirmed' : refuted >= 2 ? 'refuted' : 'inconclusive';
  return { ...finding, file, verdict, upheld, refuted, reasons: cast.map((v) => v.reason) };
}

async function verify(reviewResult, file) {
  const findings = (reviewResult?.findings ?? []).slice(0, maxFindings);
  if (findings.length === 0) return [];
  return parallel(findings.map((f) => () => vote(file, f)));
}

phase('Review');
log(`Reviewing ${files.length} file(s); up to ${maxFindings} finding(s) each go to 3 skeptics`);
const perFile = await pipeline(files, review, verify);

const all = [];
const unreviewed = [];
perFile.forEach((verdicts, i) => {
  if (verdicts === null) unreviewed.push(files[i]);
  else for (const v of verdicts) if (v) all.push(v);
});
const pick = (verdict) => all.filter((f) => f.verdict === verdict);
const confirmed = pick('confirmed');
log(`${confirmed.length} confirmed, ${pick('refuted').length} refuted, ${pick('inconclusive').length} inconclusive`);

return {
  files,
  unreviewed,
  confirmed,
  inconclusive: pick('inconclusive'),
  refuted: pick('refuted').map(({ file, title, reasons }) => ({ file, title, reasons })),
};
