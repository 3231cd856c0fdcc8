// GitHub Sync: mirrors the open issues of one repository per project into tasks.
// Runs inside the Adiuva desktop app; `api` is the host's plugin API (only the permissions
// in manifest.json are granted) and `net` its fetch, limited to the hosts the user allowed.

const GITHUB = "https://api.github.com";

function taskFromIssue(issue, projectId) {
  return {
    projectId,
    title: issue.title,
    notes: issue.html_url,
    done: issue.state === "closed",
    externalId: `github:${issue.id}`,
  };
}

async function fetchIssues(net, repo, token, since) {
  const params = new URLSearchParams({ state: "all", per_page: "100" });
  if (since) params.set("since", since);
  const response = await net.fetch(`${GITHUB}/repos/${repo}/issues?${params}`, {
    headers: { Accept: "application/vnd.github+json", Authorization: `Bearer ${token}` },
  });
  if (!response.ok) throw new Error(`GitHub answered ${response.status}`);
  return (await response.json()).filter((issue) => !issue.pull_request);
}

export async function sync({ api, net, settings }) {
  const projects = await api.projects.list();
  for (const project of projects) {
    const repo = settings.repositories[project.id];
    if (!repo) continue;
    const issues = await fetchIssues(net, repo, settings.token, settings.lastSync[project.id]);
    for (const issue of issues) {
      await api.tasks.upsert(taskFromIssue(issue, project.id));
    }
    settings.lastSync[project.id] = new Date().toISOString();
  }
  return settings;
}

export default { id: "github-sync", sync, every: "15m" };
