// Slack Notifier: posts task and calendar events to a Slack incoming webhook.

function message(kind, task) {
  const icons = { due: ":alarm_clock:", overdue: ":warning:", done: ":white_check_mark:" };
  return { text: `${icons[kind]} ${task.title}${task.due ? ` (due ${task.due})` : ""}` };
}

async function post(net, webhookUrl, payload) {
  const response = await net.fetch(webhookUrl, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
  if (!response.ok) throw new Error(`Slack answered ${response.status}`);
}

export function onTaskEvent({ net, settings }, kind, task) {
  if (!settings.events.includes(kind)) return Promise.resolve();
  return post(net, settings.webhookUrl, message(kind, task));
}

export async function dailySummary({ api, net, settings }) {
  const today = new Date().toISOString().slice(0, 10);
  const events = await api.calendar.list({ from: today, to: today });
  const lines = events.map((e) => `• ${e.start.slice(11, 16)} ${e.title}`);
  await post(net, settings.webhookUrl, { text: [`*Today* (${events.length})`, ...lines].join("\n") });
}

export default { id: "slack-notifier", onTaskEvent, dailySummary, every: "1d" };
