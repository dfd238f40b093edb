/**
 * The demo `make run` serves: a task board on `app.task`. Open it in two windows, edit, go
 * offline (DevTools), edit, come back: both converge. The token comes in the URL's fragment
 * (`#token=…`, printed by `make run`), the gateway is the page's own origin.
 */
import { createClient, type Refusal, type Row } from "../src/index.js";

// Kept for this tab's reloads, out of the address bar and the history.
const token = new URLSearchParams(location.hash.slice(1)).get("token") ?? sessionStorage.getItem("token") ?? "";
sessionStorage.setItem("token", token);
history.replaceState(null, "", location.pathname);
/** Writes the server refused: shown in the console, kept for the browser tests. */
const refusals: Refusal[] = [];
const client = createClient({
  url: location.origin,
  token,
  onConflict: (conflict) => (refusals.push(conflict), console.warn("conflict: the server's row wins", conflict)),
  onRejected: (rejection) => (refusals.push(rejection), console.warn(`refused (${rejection.error})`, rejection)),
  onError: (error) => console.warn(error),
});
const tasks = client.entity("task");
const NEXT: Record<string, string> = { open: "blocked", blocked: "done", done: "open" };

const $ = <T extends Element>(selector: string) => document.querySelector<T>(selector)!;

function card(task: Row): HTMLElement {
  const id = tasks.idOf(task);
  const element = document.createElement("div");
  element.className = "card";
  element.dataset.id = id;
  if (client.replica.pendingMutations().some((m) => m.entityCode === "task" && m.entityId === id)) {
    element.classList.add("pending");
  }
  const title = document.createElement("span");
  const assignee = typeof task.assignee === "string" ? ` · ${task.assignee}` : "";
  title.textContent = `${String(task.title)}${assignee}`;
  const move = document.createElement("button");
  move.textContent = "→";
  move.title = `Move to ${NEXT[String(task.status)]}`;
  move.onclick = () => void tasks.update(id, { status: NEXT[String(task.status)], updated_at: new Date().toISOString() });
  const remove = document.createElement("button");
  remove.textContent = "✕";
  remove.title = "Delete";
  remove.onclick = () => void tasks.delete(id);
  element.append(title, move, remove);
  return element;
}

tasks.subscribe(undefined, (rows) => {
  for (const section of document.querySelectorAll<HTMLElement>("section")) {
    const mine = rows
      .filter((t) => t.status === section.dataset.status)
      .sort((a, b) => String(a.title).localeCompare(String(b.title)));
    section.querySelector("div")!.replaceChildren(...mine.map(card));
  }
  $("#pending").textContent = client.pendingWrites ? `${client.pendingWrites} to send` : "";
});

client.onStatus((status) => {
  $("#status").textContent = status;
  $("#status").className = status;
});

$<HTMLFormElement>("#add").onsubmit = (event) => {
  event.preventDefault();
  const input = $<HTMLInputElement>("#title");
  // Ids are made here, so the new task is on the board at once and its write can be retried.
  const id = Date.now() * 1000 + Math.floor(Math.random() * 1000);
  void tasks.insert({ id, project_id: "p1", title: input.value, status: "open", updated_at: new Date().toISOString() });
  input.value = "";
};

// For the browser tests and the curious: the client from the console.
Object.assign(window, { demo: { client, tasks, refusals } });
