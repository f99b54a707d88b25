export const meta = {
  name: 'fact-check',
  description: 'Extract the factual claims of a document, find evidence for each, challenge the weakly supported ones, and label every claim.',
  whenToUse: 'Before publishing a report, blog post or design doc whose factual statements must be checked one by one.',
  phases: [
    { title: 'Extract', detail: 'One agent lists the checkable factual claims' },
    { title: 'Evidence', detail: 'One agent per claim looks for supporting or contradicting evidence' },
    { title: 'Challenge', detail: 'A skeptic re-examines only the low-confidence claims' },
  ],
};

// Pattern: extract -> pipeline per claim. The skeptic stage is conditional:
// well-supported claims pass straight through, weak ones get an adversarial
// second look, and non-claims (opinions, predictions) are dropped with null.
// args: { document?: string, maxClaims?: number, threshold?: number }

const document = typeof args?.document === 'string' && args.document.trim()
  ? args.document
  : 'QuickJS is a small embeddable JavaScript engine by Fabrice Bellard. It supports ES2023. ' +
    'SQLite in WAL mode allows concurrent readers with one writer. Postgres is the best database ever made.';
const maxClaims = Number.isInteger(args?.maxClaims) && args.maxClaims > 0 ? args.maxClaims : 10;
const threshold = typeof args?.threshold === 'number' ? args.threshold : 0.7;

const CLAIMS_SCHEMA = {
  type: 'object',
  required: ['claims'],
  properties: { claims: { type: 'array', items: { type: 'string' } } },
};
const EVIDENCE_SCHEMA = {
  type: 'object',
  required: ['stance', 'confidence', 'evidence'],
  properties: {
    stance: { type: 'string', enum: ['supports', 'contradicts', 'insufficient'] },
    confidence: { type: 'number', minimum: 0, maximum: 1 },
    evidence: { type: 'string' },
    sources: { type: 'array', items: { type: 'string' } },
  },
};
const SKEPTIC_SCHEMA = {
  type: 'object',
  required: ['isFactualClaim', 'refuted', 'reason'],
  properties: {
    isFactualClaim: { type: 'boolean' },
    refuted: { type: 'boolean' },
    reason: { type: 'string' },
  },
};

const dropped = [];
const clamp01 = (x) => (typeof x === 'number' && x >= 0 ? Math.min(x, 1) : 0);

function findEvidence(claim, _item, i) {
  return agent(
    `Find evidence for or against this claim. Cite sources you actually checked.\nClaim: ${claim}`,
    { label: `evidence #${i + 1}`, phase: 'Evidence', schema: EVIDENCE_SCHEMA },
  ).then((ev) => ({ claim, stance: ev?.stance ?? 'insufficient', confidence: clamp01(ev?.confidence),
    evidence: ev?.evidence ?? '', sources: ev?.sources ?? [] }));
}

async function challengeIfWeak(rec, _claim, i) {
  if (rec.confidence >= threshold) return rec; // strong evidence: pass through
  const s = await agent(
    `A fact-checker found only weak evidence (stance ${rec.stance}, confidence ${rec.confidence}).\n` +
    `Claim: ${rec.claim}\nEvidence: ${rec.evidence}\n` +
    'First decide whether this is a checkable factual claim at all. Then try to refute it.',
    { label: `skeptic #${i + 1}`, phase: 'Challenge', schema: SKEPTIC_SCHEMA },
  );
  if (s && s.isFactualClaim === false) {
    dropped.push({ claim: rec.claim, reason: s.reason });
    return null; // ends this claim's chain: not something we can fact-check
  }
  return { ...rec, challenged: true, refuted: s?.refuted ?? null, skepticReason: s?.reason ?? null };
}

function label(rec) {
  let status = 'unverified';
  if (rec.stance === 'contradicts' || rec.refuted === true) status = 'questionable';
  else if (rec.stance === 'supports' && (rec.confidence >= threshold || rec.refuted === false)) status = 'verified';
  return { ...rec, status };
}

phase('Extract');
const extracted = await agent(
  `List every distinct, checkable factual claim in the document below, one sentence each.\n\n${document}`,
  { label: 'extract claims', schema: CLAIMS_SCHEMA },
);
const claims = [...new Set((extracted?.claims ?? []).map((c) => String(c).trim()).filter(Boolean))].slice(0, maxClaims);
log(`Checking ${claims.length} claim(s); skeptic threshold confidence < ${threshold}`);

phase('Evidence');
const results = await pipeline(claims, findEvidence, challengeIfWeak, label);

const labelled = results.filter(Boolean);
const byStatus = { verified: [], unverified: [], questionable: [] };
for (const r of labelled) {
  byStatus[r.status].push({ claim: r.claim, stance: r.stance, confidence: r.confidence, sources: r.sources,
    skepticReason: r.skepticReason ?? null });
}
const failed = claims.filter((c, i) => results[i] === null && !dropped.some((d) => d.claim === c));
log(`verified=${byStatus.verified.length} unverified=${byStatus.unverified.length} ` +
  `questionable=${byStatus.questionable.length} dropped=${dropped.length} failed=${failed.length}`);

return { claims: claims.length, ...byStatus, dropped, failed };
