export const meta = {
  name: 'classify-and-act',
  description: 'Triage support tickets: a cheap classifier routes each ticket to a fast reply (haiku) or a deep investigation (opus).',
  whenToUse: 'Working through a backlog of tickets or bug reports where most are simple and a few need real analysis or a human.',
  phases: [
    { title: 'Classify', detail: 'haiku labels category, complexity and priority' },
    { title: 'Act', detail: 'simple tickets get a drafted reply (haiku); complex ones an investigation plan (opus)' },
    { title: 'Report', detail: 'Counts per route and the escalation list' },
  ],
};

// Pattern: classify-and-act. First decide *what* a ticket is, then decide what
// to do and with which model. pipeline() lets ticket B be classified while
// ticket A is already being handled, so the stages interleave: the agents pass
// an explicit `phase` option instead of relying on the current phase().
// args: { tickets?: [{id, title, body}] }

const input = Array.isArray(args?.tickets) && args.tickets.length > 0 ? args.tickets : [
  { id: 'T-101', title: 'Password reset email never arrives', body: 'Tried three times since Monday.' },
  { id: 'T-102', title: 'Export to CSV drops rows over 10k', body: 'Large workspaces lose data on export.' },
  { id: 'T-103', title: 'How do I change my invoice address?', body: 'Need it for accounting.' },
  { id: 'T-104', title: 'Other tenants visible in search', body: 'I can see project names of another company.' },
];
// Accept bare strings too; give every ticket an id.
const tickets = input.map((t, i) => (t && typeof t === 'object'
  ? { ...t, id: String(t.id ?? `#${i + 1}`) }
  : { id: `#${i + 1}`, title: String(t), body: '' }));

const CLASSIFY_SCHEMA = {
  type: 'object',
  required: ['category', 'complexity', 'priority'],
  properties: {
    category: { type: 'string', enum: ['bug', 'question', 'billing', 'security', 'feature'] },
    complexity: { type: 'string', enum: ['simple', 'complex'] },
    priority: { type: 'string', enum: ['p0', 'p1', 'p2', 'p3'] },
  },
};
const INVESTIGATE_SCHEMA = {
  type: 'object',
  required: ['hypothesis', 'steps', 'escalate'],
  properties: {
    hypothesis: { type: 'string' },
    steps: { type: 'array', items: { type: 'string' } },
    escalate: { type: 'boolean', description: 'true if a human engineer must take over' },
  },
};

const describe = (t) => `Ticket ${t.id}: ${t.title ?? ''}\n${t.body ?? ''}`;

function classify(ticket) {
  return agent(
    `Classify this support ticket. "complex" means it needs code investigation or touches data/security.\n\n${describe(ticket)}`,
    { label: `classify ${ticket.id}`, phase: 'Classify', model: 'haiku', schema: CLASSIFY_SCHEMA },
  );
}

async function act(cls, ticket) {
  // Security always goes the deep route, whatever the classifier thought of its complexity.
  const route = cls.category === 'security' || cls.complexity === 'complex' ? 'investigate' : 'reply';
  const base = { ...cls, id: ticket.id, route };
  if (route === 'reply') {
    const reply = await agent(
      `Draft a friendly, concise reply to this ${cls.category} ticket. No promises about dates.\n\n${describe(ticket)}`,
      { label: `reply ${base.id}`, phase: 'Act', model: 'haiku' },
    );
    return { ...base, reply, escalate: reply === null };
  }
  const plan = await agent(
    `Investigate this ${cls.priority} ${cls.category} ticket. Give a root-cause hypothesis, ` +
    `concrete next steps, and whether a human must take over.\n\n${describe(ticket)}`,
    { label: `investigate ${base.id}`, phase: 'Act', model: 'opus', effort: 'high', schema: INVESTIGATE_SCHEMA },
  );
  return { ...base, plan, escalate: plan === null || plan.escalate === true || cls.category === 'security' };
}

phase('Classify');
log(`Triaging ${tickets.length} ticket(s)`);
const handled = await pipeline(tickets, classify, act);

phase('Report');
const done = handled.filter(Boolean);
const failed = tickets.filter((_, i) => handled[i] === null).map((t) => t.id);
const byRoute = { reply: done.filter((t) => t.route === 'reply').length, investigate: done.filter((t) => t.route === 'investigate').length };
const escalations = done.filter((t) => t.escalate).map((t) => ({ id: t.id, category: t.category, priority: t.priority }));
log(`${byRoute.reply} replied, ${byRoute.investigate} investigated, ${escalations.length} escalated, ${failed.length} failed`);

return { total: tickets.length, byRoute, escalations, failed, tickets: done };
