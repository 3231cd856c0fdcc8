// Time Tracker: timers on tasks; totals per project and ISO week; entries on the timeline.

const running = new Map(); // taskId -> start time (ms)

export function start(taskId, now = Date.now()) {
  if (!running.has(taskId)) running.set(taskId, now);
}

export async function stop({ api }, taskId, now = Date.now()) {
  const startedAt = running.get(taskId);
  if (startedAt === undefined) return null;
  running.delete(taskId);
  const task = await api.tasks.get(taskId);
  const entry = {
    projectId: task.projectId,
    title: `Worked on ${task.title}`,
    start: new Date(startedAt).toISOString(),
    end: new Date(now).toISOString(),
    minutes: Math.round((now - startedAt) / 60000),
  };
  await api.timelines.addEntry(entry);
  return entry;
}

function isoWeek(date) {
  const d = new Date(Date.UTC(date.getFullYear(), date.getMonth(), date.getDate()));
  d.setUTCDate(d.getUTCDate() + 4 - (d.getUTCDay() || 7));
  const yearStart = new Date(Date.UTC(d.getUTCFullYear(), 0, 1));
  return `${d.getUTCFullYear()}-W${String(Math.ceil(((d - yearStart) / 86400000 + 1) / 7)).padStart(2, "0")}`;
}

export async function totals({ api }) {
  const entries = await api.timelines.entries({ source: "time-tracker" });
  const byProjectWeek = {};
  for (const e of entries) {
    const key = `${e.projectId} ${isoWeek(new Date(e.start))}`;
    byProjectWeek[key] = (byProjectWeek[key] || 0) + e.minutes;
  }
  return byProjectWeek;
}

export default { id: "time-tracker", start, stop, totals };
