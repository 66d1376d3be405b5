package iosched

// indexedHeap is a binary min-heap that records each item's position in the
// item itself, so that an item whose key changed can be re-sorted, or an item
// anywhere in the heap removed, in O(log n). container/heap would do the same
// through an interface; this version is typed and does not box items.
//
// Invariant: for every i, *pos(items[i]) == i, and an item not in the heap has
// position -1.
type indexedHeap[T any] struct {
	items []T
	less  func(a, b T) bool
	pos   func(T) *int
}

func (h *indexedHeap[T]) len() int { return len(h.items) }

// top returns the least item. The heap must not be empty.
func (h *indexedHeap[T]) top() T { return h.items[0] }

func (h *indexedHeap[T]) contains(x T) bool { return *h.pos(x) >= 0 }

// set inserts x, or re-sorts it if it is already in the heap.
func (h *indexedHeap[T]) set(x T) {
	i := *h.pos(x)
	if i < 0 {
		i = len(h.items)
		h.items = append(h.items, x)
		*h.pos(x) = i
		h.up(i)
		return
	}
	if !h.down(i) {
		h.up(i)
	}
}

// remove takes x out of the heap; it does nothing if x is not in it.
func (h *indexedHeap[T]) remove(x T) {
	i := *h.pos(x)
	if i < 0 {
		return
	}
	last := len(h.items) - 1
	if i != last {
		h.swap(i, last)
	}
	var zero T
	h.items[last] = zero // drop the reference for the garbage collector
	h.items = h.items[:last]
	*h.pos(x) = -1
	if i != last && !h.down(i) {
		h.up(i)
	}
}

// clear empties the heap, marking every item as out of it.
func (h *indexedHeap[T]) clear() {
	var zero T
	for i, x := range h.items {
		*h.pos(x) = -1
		h.items[i] = zero
	}
	h.items = h.items[:0]
}

func (h *indexedHeap[T]) swap(i, j int) {
	h.items[i], h.items[j] = h.items[j], h.items[i]
	*h.pos(h.items[i]) = i
	*h.pos(h.items[j]) = j
}

func (h *indexedHeap[T]) up(j int) {
	for j > 0 {
		i := (j - 1) / 2
		if !h.less(h.items[j], h.items[i]) {
			break
		}
		h.swap(i, j)
		j = i
	}
}

// down sifts the item at i0 down and reports whether it moved.
func (h *indexedHeap[T]) down(i0 int) bool {
	i, n := i0, len(h.items)
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		j := l
		if r := l + 1; r < n && h.less(h.items[r], h.items[l]) {
			j = r
		}
		if !h.less(h.items[j], h.items[i]) {
			break
		}
		h.swap(i, j)
		i = j
	}
	return i > i0
}
