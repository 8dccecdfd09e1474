"""A local module of the Modal test project: it must be shipped for the script to import."""


def loss(model, x):
    return (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
