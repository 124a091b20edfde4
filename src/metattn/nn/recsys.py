"""Rating predictors for cold-start recommendation: the MeLU model (Lee et al. KDD 2019)
and an attention model that reads the user's support ratings as a set.

Both read rows laid out as :mod:`metattn.data.movielens` writes them: ``n_genres``
multi-hot genre columns, then year slot, age bucket, gender, occupation, zip prefix and item
id (integers stored in float), followed (for :class:`RatingSetTransformer`) by the task's
support set, K blocks of those columns plus the rating. The item id is never embedded: an
item the model has never seen is described by its genres and year only.
"""

from __future__ import annotations

import torch
from torch import nn

from metattn.errors import TaskError
from metattn.nn.attention import TransformerEncoder


class MovieEmbedding(nn.Module):
    """Embeddings of a row's item (genres, release year) and user (age, gender, occupation,
    zip prefix), ``dim`` wide each (MeLU's: the genre embedding is the mean of the embedded
    genres)."""

    def __init__(self, dim: int = 32, n_items: int = 0, n_genres: int = 19,
                 year_slots: int = 81, ages: int = 7, occupations: int = 21, zips: int = 11):
        super().__init__()
        # item ids 1..n_items embedded from zero: an id no training rating reaches (a new
        # item) keeps the zero vector, "an item known by its content only"
        self.item_id = nn.Embedding(n_items + 1, dim) if n_items else None
        if self.item_id is not None:
            nn.init.zeros_(self.item_id.weight)
        self.n_genres = n_genres
        self.n_columns = n_genres + 6
        self.genre = nn.Linear(n_genres, dim, bias=False)
        self.year = nn.Embedding(year_slots, dim)
        self.age = nn.Embedding(ages, dim)
        self.gender = nn.Embedding(2, dim)
        self.occupation = nn.Embedding(occupations, dim)
        self.zip = nn.Embedding(zips, dim)
        self.item_dim, self.user_dim = (3 if n_items else 2) * dim, 4 * dim

    def item(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., columns] -> [..., 2 * dim]``."""
        g = x[..., : self.n_genres]
        genre = self.genre(g) / g.sum(-1, keepdim=True).clamp_min(1)
        parts = [genre, self.year(x[..., self.n_genres].long())]
        if self.item_id is not None:
            ids = x[..., self.n_columns - 1].long()
            parts.append(self.item_id(ids.clamp(0, self.item_id.num_embeddings - 1)))
        return torch.cat(parts, -1)

    def user(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., columns] -> [..., 4 * dim]``."""
        c = self.n_genres + 1
        parts = (self.age, self.gender, self.occupation, self.zip)
        return torch.cat([m(x[..., c + i].long()) for i, m in enumerate(parts)], -1)


def _decision(d_in: int, hidden: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """MeLU's decision layers (2 x ``hidden``) and rating output, its bias at the middle of
    the 1-5 scale so that training starts from a sensible rating."""
    out = nn.Linear(hidden, 1)
    nn.init.constant_(out.bias, 3.5)
    return nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), out


class MeLU(nn.Module):
    """MeLU's rating model: item and user embeddings concatenated, two ReLU decision layers
    (``fc1``, ``fc2``) and a linear output (``out``): ``[..., columns] -> [..., 1]``. MeLU's
    local update adapts ``fc1``, ``fc2`` and ``out`` (MAML ``inner_params``). Extra columns
    (an appended support set) are ignored."""

    def __init__(self, dim: int = 32, hidden: int = 64, n_items: int = 0, n_genres: int = 19):
        super().__init__()
        self.embed = MovieEmbedding(dim, n_items, n_genres)
        self.fc1, self.fc2, self.out = _decision(self.embed.item_dim + self.embed.user_dim,
                                                 hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[..., : self.embed.n_columns]
        h = torch.cat([self.embed.item(x), self.embed.user(x)], -1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


class RatingSetTransformer(nn.Module):
    """The query item attends over the user's support items (item embedding + rating
    embedding) through a Transformer set encoder (no positions: the support is a set); the
    query token's output and the item embedding (with ``user_features``, the user's
    demographics too) go through MeLU's decision layers, whose output corrects the user's
    mean support rating (the prediction starts from the user-mean baseline and learns what
    the support set says beyond it).

    Each row carries its task's support set (``context=True`` rows, ``[..., columns +
    K * (columns + 1)]``, any K). A support row's own entry is masked out of the attention
    (matched by item id), so on the support set the model predicts each rating from the
    OTHER support ratings: the loss MAML adapts on is not a look-up.
    """

    def __init__(self, dim: int = 32, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 hidden: int = 64, dropout: float = 0.0, n_items: int = 0,
                 user_features: bool = True, n_genres: int = 19):
        super().__init__()
        self.embed = MovieEmbedding(dim, n_items, n_genres)
        self.item_in = nn.Linear(self.embed.item_dim, d_model)
        self.user_in = nn.Linear(self.embed.user_dim, d_model) if user_features else None
        self.rating = nn.Embedding(6, d_model)  # ratings 1..5 (0 unused)
        self.encoder = TransformerEncoder(d_model, n_heads, n_layers, dropout=dropout)
        d_in = d_model + self.embed.item_dim + (self.embed.user_dim if user_features else 0)
        self.fc1, self.fc2, self.out = _decision(d_in, hidden)
        nn.init.zeros_(self.out.bias)  # the output is a correction to the support mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.embed.n_columns
        width = x.shape[-1] - c
        if width <= 0 or width % (c + 1):
            raise TaskError(
                f"RatingSetTransformer: rows have {x.shape[-1]} columns; it needs {c} feature "
                f"columns plus K blocks of {c + 1} (the support set): build the tasks with "
                "context=True (MovieLensTasks(..., context=True))")
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        own = x[:, :c]
        ctx = x[:, c:].unflatten(-1, (width // (c + 1), c + 1))  # [B, K, c + 1]
        item = self.embed.item(own)
        query, side = self.item_in(item), item  # side: what the decision layers see besides h
        if self.user_in is not None:
            user = self.embed.user(own)
            query, side = query + self.user_in(user), torch.cat([item, user], -1)
        support = self.item_in(self.embed.item(ctx[..., :c])) + self.rating(ctx[..., c].long())
        keep = ctx[..., c - 1] != own[:, None, c - 1]  # leave the row's own rating out
        keys = torch.cat([torch.ones_like(keep[:, :1]), keep], 1)
        h = self.encoder(torch.cat([query[:, None], support], 1), mask=keys[:, None, None, :])
        z = torch.cat([h[:, 0], side], -1)
        # a correction to the user's mean support rating (without the row's own)
        r = ctx[..., c] * keep
        mean = r.sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
        out = mean + self.out(torch.relu(self.fc2(torch.relu(self.fc1(z)))))
        return out.reshape(*lead, 1)
