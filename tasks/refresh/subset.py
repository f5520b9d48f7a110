"""Which rows of each table a subset copies, as one SQL predicate per table.

Three rules, so that every foreign key holds in the copy and a subset stays small:

1. **Filters choose.** A table with a `refresh.subset` filter copies the rows it selects.
2. **Children follow their parents** (the default for every table without a filter): a row
   is copied only when every parent it points to (each non-NULL foreign key) is chosen, at
   every level: order_details follow orders, their children follow them. A row whose
   nullable foreign key points at a parent that was left out is left out too: values are
   never rewritten (no SET NULL), so every copied row is a production row as it was.
   `refresh.copy_whole` lists tables that do not follow: all their rows are copied.
3. **Parents follow kept rows**: whatever a copied row points to is copied as well,
   transitively, as before (orders of the last 90 days keep their customers even when
   customers have a filter of their own). This is what makes every foreign key hold.

Rows deleted by `anonymize.delete` are never copied, and neither is any row that points at
one (through any foreign key, whatever the table's filter): the deletion cascades, as ON
DELETE CASCADE would, so no foreign key can be left dangling by it.

Cycles: inside a foreign-key cycle of n tables (departments -> employees -> departments)
rows follow their parents for n-1 steps (employees follow the chosen departments), and never
along a self reference (employees.reports_to): following to the end would need the rows that
are left out, most of a big table, in a recursive CTE. Instead rule 3 runs to its end inside
the cycle (a recursive CTE over the kept rows only), so a kept employee brings its manager,
the manager's manager and their departments. Every foreign key holds either way.

Everything is computed by SQL on the source, inside the refresh's snapshot: nothing is
written there and nothing is held here. Each table's chosen, kept and deleted rows are a
CTE (their key columns and `tableoid`), defined once from the CTEs of its neighbours, so
the query for a table grows with the number of foreign keys, not with their combinations.
Foreign keys declared on (or pointing at) one partition only apply to that partition's rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from psycopg import sql

from dataops.errors import BadInput
from dataops.tasks.anonymize.rules import TableInfo
from dataops.tasks.refresh.catalog import Edge, Rel

MAX_QUERY_CHARS = 200_000
REL, TID = sql.Identifier("dataops_rel"), sql.Identifier("dataops_tid")


class Pred:
    """A condition on one row of a table, for any alias, and the CTEs it reads."""

    def __init__(self, render: Callable[[sql.Identifier], sql.Composable], deps=()):
        self.render, self.deps = render, frozenset(deps)

    def __call__(self, alias: sql.Identifier) -> sql.Composable:
        return self.render(alias)


def _join(word: str, preds: list[Pred | None]) -> Pred | None:
    parts = [p for p in preds if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return Pred(lambda a: sql.SQL(f" {word} ").join(sql.SQL("({})").format(p(a)) for p in parts),
                frozenset().union(*(p.deps for p in parts)))


def all_of(preds: list[Pred | None]) -> Pred | None:
    return _join("AND", preds)


def any_of(preds: list[Pred | None]) -> Pred | None:
    return _join("OR", preds)


def text(condition: str) -> Pred:
    """A condition from dataops.yaml: SQL on the table's own (unqualified) columns."""
    return Pred(lambda a: sql.SQL(condition))


def negate(p: Pred) -> Pred:
    return Pred(lambda a: sql.SQL("NOT ({})").format(p(a)), p.deps)


def _in_tree(expr: sql.Composable, scope: Rel) -> sql.Composable:
    return sql.SQL("{} IN (SELECT relid FROM pg_partition_tree({}::regclass))").format(expr, sql.Literal(scope.regclass))


def _col(alias: sql.Identifier, column: str) -> sql.Composable:
    return sql.SQL("{}.{}").format(alias, sql.Identifier(column))


class Subset:
    """The predicates of one refresh: `keep_for(label)` gives the rows of a table to copy."""

    def __init__(self, tables: dict[str, TableInfo], edges: list[Edge], copied: set[str], filters: dict[str, str],
                 deletes: dict[str, str], copy_whole: set[str]):
        self.tables, self.filters, self.deletes, self.copy_whole = tables, filters, deletes, copy_whole
        self.index = {label: i for i, label in enumerate(tables)}
        self.out: dict[str, list[Edge]] = {}
        self.inc: dict[str, list[Edge]] = {}
        for e in edges:
            if e.child in copied and e.parent in copied:
                self.out.setdefault(e.child, []).append(e)
                self.inc.setdefault(e.parent, []).append(e)
        components = strongly_connected(sorted(copied), {t: [e.parent for e in self.out.get(t, [])] for t in copied})
        self.component = {t: k for k, comp in enumerate(components) for t in comp}
        self.ctes: dict[str, tuple[sql.Composable, frozenset[str]]] = {}  # in dependency order
        self.aliases = itertools.count(1)
        self.gone: dict[str, Pred | None] = {}
        self.chosen: dict[str, Pred | None] = {}
        self.keep: dict[str, Pred | None] = {}
        self.extra: dict[str, bool] = {}  # keep may hold rows beyond chosen (parents of kept rows)
        for k, comp in enumerate(components):  # parents before children
            self._gone(k, comp)
        for comp in components:
            self._choose(comp)
        for k, comp in reversed(list(enumerate(components))):  # children before parents
            self._keep(k, comp)

    # -- the result ---------------------------------------------------------------------------

    def keep_for(self, label: str) -> tuple[sql.Composable | None, list[sql.Composable]]:
        """(predicate on alias t0, the CTEs it needs in order); (None, []) for every row."""
        p = self.keep.get(label)
        if p is None:
            return None, []
        pred = p(sql.Identifier("t0"))
        needed: set[str] = set()
        todo = list(p.deps)
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(self.ctes[name][1])
        ctes = [self.ctes[name][0] for name in self.ctes if name in needed]
        size = len(pred.as_string()) + sum(len(c.as_string()) for c in ctes)
        if size > MAX_QUERY_CHARS:
            raise BadInput(f"refresh.subset: the query choosing the rows of {label} grows too large ({size:,} "
                           "characters); filter fewer tables or list some in refresh.copy_whole")
        return pred, ctes

    # -- helpers ----------------------------------------------------------------------------------

    def _alias(self) -> sql.Identifier:
        return sql.Identifier(f"x{next(self.aliases)}")

    def _rel(self, label: str) -> Rel:
        t = self.tables[label]
        return Rel(t.schema, t.name, t.relkind)

    def _intra(self, e: Edge) -> bool:
        return self.component[e.child] == self.component[e.parent]

    def _cyclic(self, comp: list[str]) -> bool:
        return any(self._intra(e) for t in comp for e in self.out.get(t, []))

    def _follows(self, label: str) -> bool:
        return label not in self.filters and label not in self.copy_whole

    def _cte(self, name: str, body: sql.Composable, deps, columns: sql.Composable | None = None) -> str:
        if name not in self.ctes:
            head = sql.Identifier(name) if columns is None else sql.SQL("{}({})").format(sql.Identifier(name), columns)
            self.ctes[name] = (sql.SQL("{} AS ({})").format(head, body), frozenset(deps))
        return name

    def _rows_cte(self, prefix: str, label: str, pred: Pred | None, columns: list[str]) -> str:
        """CTE: `tableoid` and `columns` of the rows of `label` that `pred` selects."""
        a = sql.Identifier("a")
        body = sql.SQL("SELECT a.tableoid AS {}{} FROM {} AS a{}").format(
            REL, sql.SQL("").join(sql.SQL(", ") + _col(a, c) for c in columns), self._rel(label).scan,
            sql.SQL(" WHERE {}").format(pred(a)) if pred is not None else sql.SQL(""))
        return self._cte(f"dataops_{prefix}_{self.index[label]}", body, pred.deps if pred else ())

    def _parent_columns(self, label: str) -> list[str]:
        return list(dict.fromkeys(c for e in self.inc.get(label, []) for c in e.parent_columns))

    def _child_columns(self, label: str) -> list[str]:
        return list(dict.fromkeys(c for e in self.out.get(label, []) for c in e.child_columns))

    def _points_into(self, e: Edge, cte: str, *, null_passes: bool) -> Pred:
        """The child row's parent under `e` is one of the rows of `cte` (a CTE of the parent).
        null_passes: a row with a NULL in the key, or outside the partition `e` is declared
        on, has no parent under `e` and passes; otherwise it fails."""
        def render(a: sql.Identifier) -> sql.Composable:
            s = self._alias()
            match = [sql.SQL("{} = {}").format(_col(s, pc), _col(a, cc)) for pc, cc in zip(e.parent_columns, e.child_columns)]
            if e.parent_scope is not None:
                match.append(_in_tree(sql.SQL("{}.{}").format(s, REL), e.parent_scope))
            exists = sql.SQL("EXISTS (SELECT 1 FROM {} AS {} WHERE {})").format(
                sql.Identifier(cte), s, sql.SQL(" AND ").join(match))
            if not null_passes:
                return sql.SQL("{} AND {}").format(_in_tree(sql.SQL("{}.tableoid").format(a), e.child_scope), exists) \
                    if e.child_scope is not None else exists
            passes = [sql.SQL("{} IS NULL").format(_col(a, cc)) for cc in e.child_columns]
            if e.child_scope is not None:
                passes.append(sql.SQL("NOT {}").format(_in_tree(sql.SQL("{}.tableoid").format(a), e.child_scope)))
            return sql.SQL("({} OR {})").format(sql.SQL(" OR ").join(passes), exists)
        return Pred(render, {cte})

    def _pointed_at(self, e: Edge, cte: str) -> Pred:
        """The parent row is pointed at under `e` by one of the rows of `cte` (a CTE of the child)."""
        def render(a: sql.Identifier) -> sql.Composable:
            k = self._alias()
            match = [sql.SQL("{} = {}").format(_col(k, cc), _col(a, pc)) for cc, pc in zip(e.child_columns, e.parent_columns)]
            if e.child_scope is not None:
                match.append(_in_tree(sql.SQL("{}.{}").format(k, REL), e.child_scope))
            exists = sql.SQL("EXISTS (SELECT 1 FROM {} AS {} WHERE {})").format(
                sql.Identifier(cte), k, sql.SQL(" AND ").join(match))
            if e.parent_scope is not None:
                return sql.SQL("{} AND {}").format(_in_tree(sql.SQL("{}.tableoid").format(a), e.parent_scope), exists)
            return exists
        return Pred(render, {cte})

    def _member_of(self, cte: str) -> Pred:
        def render(a: sql.Identifier) -> sql.Composable:
            m = self._alias()
            return sql.SQL("EXISTS (SELECT 1 FROM {c} AS {m} WHERE {m}.{r} = {a}.tableoid AND {m}.{t} = {a}.ctid)").format(
                c=sql.Identifier(cte), m=m, r=REL, t=TID, a=a)
        return Pred(render, {cte})

    def _closure_cte(self, name: str, comp: list[str], seeds: dict[str, Pred | None], upward: bool) -> str:
        """Recursive CTE of the rows of a foreign-key cycle reached from the seed rows: every row
        they point to, transitively (upward), or every row pointing at them (not upward).

        A row is (table number, tableoid, ctid, its key values as text); the next step finds
        its parents (children) by those values cast back to the column types, so each step is
        an index lookup on the parent's key, not a scan of the child."""
        number = {label: k for k, label in enumerate(comp)}
        edges = [e for label in comp for e in self.out.get(label, []) if self._intra(e)]
        keys = {label: list(dict.fromkeys([c for e in edges if e.child == label for c in e.child_columns]
                                          + [c for e in edges if e.parent == label for c in e.parent_columns]))
                for label in comp}

        def values(label: str, alias: str) -> sql.Composable:
            return sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(
                sql.SQL("{}.{}::text").format(sql.Identifier(alias), sql.Identifier(c)) for c in keys[label]))

        def match(alias: str, label: str, columns, from_label: str, from_columns) -> sql.Composable:
            parts = []
            for col, src in zip(columns, from_columns):
                value = sql.SQL("w.dataops_vals[{}]").format(sql.Literal(keys[from_label].index(src) + 1))
                column = self.tables[label].column(col)
                if column is None:  # not a stored column we know the type of: compare as text
                    parts.append(sql.SQL("{}.{}::text = {}").format(sql.Identifier(alias), sql.Identifier(col), value))
                else:
                    parts.append(sql.SQL("{}.{} = CAST({} AS {})").format(
                        sql.Identifier(alias), sql.Identifier(col), value, sql.SQL(column.type)))
            return sql.SQL(" AND ").join(parts)

        a = sql.Identifier("a")
        parts, deps = [], set()
        for label in comp:
            if label not in seeds:
                continue
            seed = seeds[label]
            parts.append(sql.SQL("SELECT {}, a.tableoid, a.ctid, {} FROM {} AS a{}").format(
                sql.Literal(number[label]), values(label, "a"), self._rel(label).scan,
                sql.SQL(" WHERE {}").format(seed(a)) if seed is not None else sql.SQL("")))
            deps |= seed.deps if seed is not None else set()
        steps = []
        for e in edges:
            if upward:  # from a row of the child to its parent
                src, dst, rel, on = e.child, e.parent, e.parent_rel, match("n", e.parent, e.parent_columns,
                                                                           e.child, e.child_columns)
                scope = e.child_scope
            else:  # from a row of the parent to its children
                src, dst, rel, on = e.parent, e.child, e.child_rel, match("n", e.child, e.child_columns,
                                                                          e.parent, e.parent_columns)
                scope = e.parent_scope
            where = [sql.SQL("w.dataops_t = {}").format(sql.Literal(number[src])), on]
            if scope is not None:
                where.append(_in_tree(sql.SQL("w.{}").format(REL), scope))
            steps.append(sql.SQL("SELECT {}, n.tableoid, n.ctid, {} FROM {} AS n WHERE {}").format(
                sql.Literal(number[dst]), values(dst, "n"), rel.scan, sql.SQL(" AND ").join(where)))
        body = sql.SQL("{} UNION SELECT x.* FROM {} AS w CROSS JOIN LATERAL ({}) AS x").format(
            sql.SQL(" UNION ALL ").join(parts), sql.Identifier(name), sql.SQL(" UNION ALL ").join(steps))
        return self._cte(name, body, deps, sql.SQL("dataops_t, {}, {}, dataops_vals").format(REL, TID))

    # -- the three passes ---------------------------------------------------------------------------

    def _gone(self, k: int, comp: list[str]) -> None:
        """Rows deleted by anonymize.delete, and rows pointing at them (any foreign key)."""
        direct: dict[str, Pred | None] = {}
        for label in comp:
            parts = [text(self.deletes[label])] if label in self.deletes else []
            for e in self.out.get(label, []):
                if not self._intra(e) and self.gone.get(e.parent) is not None:
                    cte = self._rows_cte("gone", e.parent, self.gone[e.parent], self._parent_columns(e.parent))
                    parts.append(self._points_into(e, cte, null_passes=False))
            direct[label] = any_of(parts)
        if self._cyclic(comp) and any(direct.values()):
            name = self._closure_cte(f"dataops_gone_cycle_{k}", comp,
                                     {t: p for t, p in direct.items() if p is not None}, upward=False)
            for label in comp:
                self.gone[label] = self._member_of(name)
        else:
            self.gone.update(direct)

    def _choose(self, comp: list[str]) -> None:
        """Rows chosen by a filter, or following their parents' chosen rows."""
        rounds = len(comp) - 1  # inside a cycle of n tables, following spreads one table a round
        before: dict[str, str] = {}
        for r in range(rounds + 1):
            now: dict[str, Pred | None] = {}
            for label in comp:
                parts = [text(self.filters[label])] if label in self.filters else []
                if self.gone.get(label) is not None:
                    parts.append(negate(self.gone[label]))
                if self._follows(label):
                    for e in self.out.get(label, []):
                        if not self._intra(e) and self.chosen.get(e.parent) is not None:
                            cte = self._rows_cte("chosen", e.parent, self.chosen[e.parent],
                                                 self._parent_columns(e.parent))
                            parts.append(self._points_into(e, cte, null_passes=True))
                        elif self._intra(e) and not e.self_reference and e.parent in before:
                            parts.append(self._points_into(e, before[e.parent], null_passes=True))
                now[label] = all_of(parts)
            if r < rounds:
                before = {t: self._rows_cte(f"chosen_r{r}", t, p, self._parent_columns(t))
                          for t, p in now.items() if p is not None}
        self.chosen.update(now)

    def _keep(self, k: int, comp: list[str]) -> None:
        """Chosen rows, plus every row a kept row points to."""
        def pulled(label: str) -> Pred | None:
            parts = []
            for e in self.inc.get(label, []):
                child = e.child
                if self._intra(e):
                    continue
                if self._follows(child) and not self.extra[child]:
                    continue  # the child's kept rows are chosen rows, and they point into ours
                cte = self._rows_cte("keep", child, self.keep[child], self._child_columns(child))
                parts.append(self._pointed_at(e, cte))
            return any_of(parts)

        def never_deleted(label: str, p: Pred) -> Pred:
            return all_of([p, negate(text(self.deletes[label]))]) if label in self.deletes else p

        if all(self.chosen[t] is None for t in comp):
            for label in comp:
                self.keep[label], self.extra[label] = None, False
            return
        if not self._cyclic(comp):
            label = comp[0]
            up = pulled(label)
            self.keep[label] = never_deleted(label, any_of([self.chosen[label], up]))
            self.extra[label] = up is not None
            return
        seeds = {t: (any_of([self.chosen[t], pulled(t)]) if self.chosen[t] is not None else None) for t in comp}
        name = self._closure_cte(f"dataops_keep_cycle_{k}", comp, seeds, upward=True)
        for label in comp:
            narrowed = self.chosen[label] is not None
            self.keep[label] = never_deleted(label, self._member_of(name)) if narrowed else None
            self.extra[label] = narrowed


def strongly_connected(nodes: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively; a component comes after every
    component it has an edge to (with child -> parent edges: parents first)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ.get(start, [])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ.get(w, []))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out
