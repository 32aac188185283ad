// keyledger KeyGrid: the browser half of widgets/grid.py (anywidget ESM, no dependencies).
// Cells are set with textContent, never parsed as HTML: key names, tags and owners are data.
const ISO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}/;

function cellText(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "string" && ISO_TIME.test(value)) {
    return value.slice(0, 16).replace("T", " "); // to the minute, UTC
  }
  return String(value);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function render({ model, el: host }) {
  const box = el("div", "kl-grid");
  box.tabIndex = 0; // arrow keys move the selection
  const table = el("table");
  const colgroup = el("colgroup");
  const thead = el("thead");
  const tbody = el("tbody");
  table.append(colgroup, thead, tbody);
  box.append(table);
  host.append(box);

  const keyOf = (row) => row[model.get("key_field")];

  function select(key) {
    model.set("selected", key === undefined ? null : key);
    model.save_changes();
  }

  function drawHead() {
    const columns = model.get("columns") || [];
    const sort = model.get("sort");
    colgroup.replaceChildren();
    const head = el("tr");
    let width = 0;
    for (const column of columns) {
      const col = el("col");
      col.style.width = `${column.width || 100}px`;
      width += column.width || 100;
      colgroup.append(col);
      const th = el("th", "", column.title ?? column.field);
      th.dataset.field = column.field;
      th.title = column.sortable === false ? column.title : `sort by ${column.title}`;
      if (sort && sort.column === column.field) {
        th.classList.add(sort.descending ? "kl-sorted-desc" : "kl-sorted-asc");
        th.setAttribute("aria-sort", sort.descending ? "descending" : "ascending");
      }
      if (column.sortable === false) th.classList.add("kl-unsortable");
      head.append(th);
    }
    table.style.width = `${width}px`;
    thead.replaceChildren(head);
  }

  function drawBody() {
    const columns = model.get("columns") || [];
    const rows = model.get("rows") || [];
    const colors = model.get("colors") || {};
    const selected = model.get("selected");
    box.style.height = `${model.get("height")}px`;
    if (!rows.length) {
      const tr = el("tr");
      const td = el("td", "kl-empty", model.get("empty"));
      td.colSpan = Math.max(columns.length, 1);
      tr.append(td);
      tbody.replaceChildren(tr);
      return;
    }
    const trs = rows.map((row) => {
      const tr = el("tr");
      const key = keyOf(row);
      tr.dataset.key = key;
      if (key === selected) tr.classList.add("kl-selected");
      for (const column of columns) {
        const text = cellText(row[column.field]);
        const td = el("td", "", text);
        td.title = text;
        const colour = (colors[column.field] || {})[row[column.field]];
        if (colour) {
          td.style.color = colour;
          td.classList.add("kl-status");
        }
        tr.append(td);
      }
      return tr;
    });
    tbody.replaceChildren(...trs);
  }

  function markSelected() {
    const selected = model.get("selected");
    for (const tr of tbody.querySelectorAll("tr[data-key]")) {
      const on = tr.dataset.key === selected;
      tr.classList.toggle("kl-selected", on);
      if (on) tr.scrollIntoView({ block: "nearest", inline: "nearest" });
    }
  }

  thead.addEventListener("click", (event) => {
    const th = event.target.closest("th");
    if (!th || th.classList.contains("kl-unsortable")) return;
    const sort = model.get("sort");
    const again = sort && sort.column === th.dataset.field;
    model.set("sort", { column: th.dataset.field, descending: again ? !sort.descending : false });
    model.save_changes();
  });
  tbody.addEventListener("click", (event) => {
    const tr = event.target.closest("tr[data-key]");
    if (tr) select(tr.dataset.key);
  });
  box.addEventListener("keydown", (event) => {
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    const names = (model.get("rows") || []).map(keyOf);
    if (!names.length) return;
    const at = names.indexOf(model.get("selected"));
    const step = event.key === "ArrowDown" ? 1 : -1;
    const next = at < 0 ? 0 : Math.min(names.length - 1, Math.max(0, at + step));
    event.preventDefault();
    select(names[next]);
  });

  const redraw = () => { drawHead(); drawBody(); };
  model.on("change:columns", redraw);
  model.on("change:sort", drawHead);
  model.on("change:rows", drawBody);
  model.on("change:colors", drawBody);
  model.on("change:height", drawBody);
  model.on("change:empty", drawBody);
  model.on("change:selected", markSelected);
  redraw();
  return () => {
    for (const name of ["columns", "sort", "rows", "colors", "height", "empty", "selected"]) {
      model.off(`change:${name}`);
    }
  };
}

export default { render };
